"""`kill -9` in the middle of precompute and of training, then finish: nothing lost, doubled or half-written.

The same trials as `tests/kill_trials.py`, a few of them, with kills placed by what the run has written
rather than by a random delay.
"""

from __future__ import annotations

import glob
import os

import pytest
from kill_trials import Setup, make_setup, precompute_trial, prepare_references, train_trial


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models) -> Setup:
    """Four clips and the uninterrupted precompute and training every trial is compared with."""
    setup = make_setup(tmp_path_factory.mktemp("kill"), clips=4, models=tiny_models)
    prepare_references(setup)
    return setup


def manifests(out: str, kind: str) -> int:
    return len(glob.glob(os.path.join(out, "manifest", kind, "*", "*.json")))


def test_kill_after_the_first_committed_clip(setup):
    out = str(setup.root / "one_per_segment")
    landed, problems = precompute_trial(setup, out, 0.0, 1, after=lambda: manifests(out, "teacher") >= 1)
    assert landed.startswith("killed"), landed
    assert problems == []


def test_kill_in_the_middle_of_a_segment(setup):
    out = str(setup.root / "default_segments")  # all four clips share one segment, committed at the end
    landed, problems = precompute_trial(setup, out, 0.3, None, after=lambda: manifests(out, "text") >= 1)
    assert landed.startswith("killed"), landed
    assert problems == []


def test_kill_after_the_first_checkpoint_then_resume(setup):
    output_dir = str(setup.root / "run")
    first = os.path.join(output_dir, "checkpoint-2")
    landed, problems = train_trial(setup, output_dir, 0.0, after=lambda: os.path.isdir(first))
    assert landed.startswith("killed"), landed
    assert problems == []
