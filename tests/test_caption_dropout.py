"""Caption dropout: which clips are drawn, what replaces their text, and caches made before the empty prompt was."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_train import train_config

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.families import Conditioning
from crepa.schedule import CrepaWeightSchedule
from train.caption_dropout import drop_captions, dropped_captions
from train.data import prompt_conditioning
from train.trainer import StepParts, run_train, train_step


def test_draws_follow_seed_step_and_clip_at_the_rate():
    keys = [f"clip{i}" for i in range(4000)]
    drawn = dropped_captions(keys, seed=0, step=5, rate=0.1)
    assert drawn == dropped_captions(keys, seed=0, step=5, rate=0.1)
    assert 0.085 < sum(drawn) / len(keys) < 0.115
    assert drawn != dropped_captions(keys, seed=0, step=6, rate=0.1)
    assert drawn != dropped_captions(keys, seed=1, step=5, rate=0.1)
    # a clip's draw does not depend on the batch it is in
    assert dropped_captions(keys[7:9], seed=0, step=5, rate=0.1) == drawn[7:9]
    assert not any(dropped_captions(keys, 0, 5, 0.0)) and all(dropped_captions(keys, 0, 5, 1.0))
    lower = dropped_captions(keys, 0, 5, 0.05)
    assert all(d for d, low in zip(drawn, lower, strict=True) if low), "a higher rate drops a superset"


def test_dropped_clips_get_every_empty_prompt_array_and_the_others_keep_theirs():
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :4] = True
    clips = Conditioning(torch.randn(4, 6, 8, generator=generator), mask, torch.randn(4, 3, generator=generator),
                         torch.tensor([16.0, 24.0, 8.0, 30.0]))
    empty = Conditioning(torch.zeros(1, 6, 8), torch.zeros(1, 6, dtype=torch.bool), torch.full((1, 3), 7.0))
    empty.text[0, 0], empty.text_mask[0, 0] = 1.0, True
    dropped = [False, True, False, True]
    out = drop_captions(clips, empty, dropped)
    for row, drop in enumerate(dropped):
        source = empty if drop else clips
        index = 0 if drop else row
        for name in ("text", "text_mask", "text_pooled"):
            assert torch.equal(getattr(out, name)[row], getattr(source, name)[index]), (row, name)
    assert torch.equal(out.fps, clips.fps), "the frame rate is the clip's"
    assert drop_captions(clips, empty, [False] * 4) is clips


def test_a_step_conditions_exactly_the_drawn_clips_on_the_cached_empty_prompt(trained_cache, tiny_models, wan,
                                                                             tmp_path):
    adapter, transformer = wan
    view = CacheView(CacheStore.open(trained_cache), "wan", with_teacher=False)
    length = view.text.attrs["max_length"]
    empty = prompt_conditioning([view.prompt_text("")], length)
    keys = [f"clip{i}" for i in range(12)]
    batch = {"keys": keys, "latents": torch.randn(12, 4, 3, 4, 6), "text": torch.randn(12, length, 16),
             "text_mask": torch.ones(12, length, dtype=torch.bool)}
    seen = []
    hook = transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        for rate in (0.0, 0.5):
            cfg = train_config(trained_cache, tiny_models, str(tmp_path), crepa_enabled=False, caption_dropout=rate)
            parts = StepParts(adapter, transformer, None, CrepaWeightSchedule(cfg.schedule_config()), cfg, {},
                              empty_text=empty if rate else None)
            with torch.no_grad():
                train_step(parts, batch, 3, torch.device("cpu"))
    finally:
        hook.remove()
    plain, dropped = seen
    drawn = dropped_captions(keys, 0, 3, 0.5)
    assert 0 < sum(drawn) < len(keys)
    for row, drop in enumerate(drawn):
        expected = empty.text[0] if drop else batch["text"][row]
        assert torch.equal(dropped["encoder_hidden_states"][row], expected), row
    # the noise and the timesteps are drawn as without dropout
    assert torch.equal(dropped["hidden_states"], plain["hidden_states"])
    assert torch.equal(dropped["timestep"], plain["timestep"])


def forget_prompts(cache: str) -> str:
    """Make `cache` look as it would have before precompute encoded the empty prompt: no entry for it."""
    view = CacheView(CacheStore.open(cache), "wan", with_teacher=False)
    key = view.prompt_key("")
    folder = os.path.join(cache, "manifest", view.text.path)
    for name in os.listdir(folder):
        manifest = json.load(open(os.path.join(folder, name)))
        if manifest["entries"].pop(key, None) is not None:
            json.dump(manifest, open(os.path.join(folder, name), "w"))
    return key


def test_a_cache_made_before_the_empty_prompt_asks_for_a_precompute_rerun(tmp_path, trained_cache, tiny_models):
    from test_validation import precompute_again

    from crepa.cache.export import export_view

    cache = str(tmp_path / "cache")
    shutil.copytree(trained_cache, cache)
    forget_prompts(cache)
    with pytest.raises(ValueError, match=r"--caption-dropout needs the text of prompt\(s\) ''.*cache does not hold.*"
                                         rf"rerun `crepa precompute --config \S+ --family wan --out {cache}`"):
        run_train(train_config(cache, tiny_models, str(tmp_path / "a"), caption_dropout=0.1))
    shards = str(tmp_path / "shards")
    export_view(cache, shards)
    assert not os.path.exists(os.path.join(shards, "prompts.tar"))
    with pytest.raises(ValueError, match=r"--caption-dropout needs.*then re-export them with `crepa cache export "
                                         rf"--format wds CACHE {shards} --overwrite`"):
        run_train(train_config(shards, tiny_models, str(tmp_path / "b"), caption_dropout=0.1))
    rerun = precompute_again(cache, tiny_models)  # what the error says to do
    assert rerun.computed == {"latents": 0, "teacher": 0, "text": 1}
    assert CacheView(CacheStore.open(cache), "wan").prompt_text("") is not None
