"""The CREPA weight schedule at chosen steps."""

import math

import pytest

from crepa.schedule import CrepaScheduleConfig, CrepaWeightSchedule


def schedule(**kw):
    return CrepaWeightSchedule(CrepaScheduleConfig(**kw))


def test_constant():
    s = schedule(weight=0.5)
    assert [s.weight(t) for t in (0, 1, 1000)] == [0.5, 0.5, 0.5]


def test_warmup_then_constant():
    s = schedule(weight=1.0, warmup_steps=4)
    assert [s.weight(t) for t in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert not s.needs_scores(0) and s.needs_scores(1)


@pytest.mark.parametrize(
    "scheduler, extra, expected",
    [
        ("linear", {}, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
        ("cosine", {}, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]),
        ("polynomial", {"power": 2.0}, [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]),
    ],
)
def test_decays_reach_end_at_decay_step(scheduler, extra, expected):
    s = schedule(weight=1.0, weight_end=0.0, scheduler=scheduler, decay_steps=4, **extra)
    got = [s.weight(t) for t in (0, 1, 2, 3, 4, 10)]
    assert got == pytest.approx(expected)


def test_decay_to_nonzero_end_after_warmup():
    s = schedule(weight=1.0, weight_end=0.2, scheduler="linear", warmup_steps=2, decay_steps=6)
    assert [s.weight(t) for t in (0, 1, 2, 4, 6, 8)] == pytest.approx([0.0, 0.5, 1.0, 0.6, 0.2, 0.2])


def test_cutoff_step_turns_it_off_and_skips_work():
    s = schedule(weight=0.5, cutoff_step=3)
    assert [s.weight(t) for t in (2, 3, 100)] == [0.5, 0.0, 0.0]
    assert s.needs_scores(2) and not s.needs_scores(3)


def test_permanent_threshold_stays_off():
    s = schedule(weight=0.5, similarity_threshold=0.6, similarity_ema_decay=0.5)
    s.observe(0.4)  # ema 0.4
    assert s.weight(1) == 0.5
    s.observe(1.0)  # ema 0.7 > 0.6
    assert s.weight(2) == 0.0 and not s.needs_scores(2)
    s.observe(0.0)  # ema 0.35, but permanent
    assert s.weight(3) == 0.0


def test_recoverable_threshold_comes_back_and_keeps_measuring():
    s = schedule(weight=0.5, similarity_threshold=0.6, similarity_ema_decay=0.5, threshold_mode="recoverable")
    s.observe(0.8)  # ema 0.8 > 0.6
    assert s.weight(1) == 0.0 and s.needs_scores(1)
    s.observe(0.2)  # ema 0.5 < 0.6
    assert s.weight(2) == 0.5


def test_state_round_trip():
    s = schedule(weight=0.5, similarity_threshold=0.6, similarity_ema_decay=0.5)
    s.observe(0.9)
    restored = schedule(weight=0.5, similarity_threshold=0.6, similarity_ema_decay=0.5)
    restored.load_state_dict(s.state_dict())
    assert restored.similarity_ema == 0.9 and restored.weight(5) == 0.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(scheduler="step"), "crepa_scheduler='step' is unknown"),
        (dict(scheduler="cosine", decay_steps=0), "needs crepa_decay_steps"),
        (dict(threshold_mode="sometimes"), "crepa_threshold_mode"),
        (dict(warmup_steps=-1), "crepa_warmup_steps must be >= 0"),
    ],
)
def test_bad_options_name_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        CrepaScheduleConfig(**kw)
