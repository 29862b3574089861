"""Kill trials: SIGKILL `precompute` and `train` at random moments, finish the job, and check nothing was lost.

    python tests/kill_trials.py --precompute 20 --train 10 [--seed 0] [--workdir DIR]

Each trial runs the real command in its own process group (decode workers and loader workers included),
kills the whole group after a seeded random delay spread over an uninterrupted run's duration, reruns it
to completion, and compares the result with that uninterrupted run:

- precompute: every planned clip (and caption) is committed exactly once in every feature set, counted
  from the manifest files; `verify` finds no problem (orphan segments of the killed run are allowed);
  every array read with plain `zarr` equals the uninterrupted run's, key by key.
- train: rerun with `--resume latest` (fresh when no checkpoint was written yet) to the same step count;
  the LoRA and projector equal the uninterrupted run's, and no `checkpoint-N.tmp` folder is left.

`tests/test_kill.py` runs a few of these trials with fixed delays in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 20
CHECKPOINT_EVERY = 2
ATOL = 1e-6


@dataclass
class Setup:
    """Everything a trial needs: tiny models, a dataset, and the uninterrupted runs to compare with."""

    root: Path
    models: dict[str, str]
    dataset: str
    reference_cache: str = ""
    reference_run: str = ""
    precompute_seconds: float = 0.0
    train_seconds: float = 0.0
    train_loop_seconds: float = 0.0
    """From the training loop's start (train_config.json written) to the end."""


def make_setup(root: Path, clips: int = 8, models: dict[str, str] | None = None) -> Setup:
    """Tiny models (unless given) and `clips` captioned mp4 clips under root."""
    from conftest import write_dataset

    if models is None:
        from crepa.families import get_family
        from crepa.tiny_models import save_tiny_dinov2, save_tiny_pipeline

        models = {"wan": save_tiny_pipeline(get_family("wan"), str(root / "models" / "wan")),
                  "dinov2": save_tiny_dinov2(str(root / "models" / "dinov2"))}
    return Setup(root, models, write_dataset(root / "data", clips=clips))


def precompute_argv(setup: Setup, out: str, segment_clips: int | None) -> list[str]:
    """The real `python -m precompute` command; one decode worker, so a kill also hits a decode process."""
    extra = ["--segment-clips", str(segment_clips)] if segment_clips else []
    return [sys.executable, "-m", "precompute", "--config", setup.dataset, "--family", "wan", "--out", out,
            "--model", setup.models["wan"], "--encoder", setup.models["dinov2"], "--encoder-image-size", "56",
            "--device", "cpu", "--decode-workers", "1", *extra]


def train_argv(setup: Setup, output_dir: str, resume: bool) -> list[str]:
    """The real `python -m train` command; checkpoints every 2 steps so kills land around checkpoint writes."""
    extra = ["--resume", "latest"] if resume else []
    return [sys.executable, "-m", "train", "--cache", setup.reference_cache, "--family", "wan",
            "--model", setup.models["wan"], "--output-dir", output_dir, "--crepa-block-index", "1",
            "--max-train-steps", str(TRAIN_STEPS), "--save-every", str(CHECKPOINT_EVERY),
            "--batch-size", "1", "--dataloader-num-workers", "1", "--report-to", "none", "--seed", "0", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(argv: list[str], after: Callable[[], bool] | None = None) -> tuple[float, float]:
    """Run a command to completion (failing loudly); returns its wall time, and the part after `after()` first
    held (the whole when not given)."""
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
        while after is not None and not after() and process.poll() is None:
            time.sleep(0.02)
        mark = time.perf_counter() if after is not None else start
        if process.wait():
            errors.seek(0)
            raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n{errors.read()[-3000:]}")
    end = time.perf_counter()
    return end - start, end - mark


def run_and_kill(argv: list[str], delay: float, after: Callable[[], bool] | None = None) -> bool:
    """Start the command in its own process group and SIGKILL the group `delay` s after it starts (or after
    `after()` first holds); False if the command ended before that."""
    process = subprocess.Popen(argv, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while after is not None and not after():
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def prepare_references(setup: Setup, train: bool = True) -> None:
    """The uninterrupted runs every trial is compared with, timed to spread the kills over their duration."""
    setup.reference_cache = str(setup.root / "reference_cache")
    setup.precompute_seconds, _ = run_to_end(precompute_argv(setup, setup.reference_cache, None))
    if train:
        setup.reference_run = str(setup.root / "reference_run")
        setup.train_seconds, setup.train_loop_seconds = run_to_end(
            train_argv(setup, setup.reference_run, resume=False),
            after=lambda: os.path.exists(loop_started(setup.reference_run)))


def loop_started(output_dir: str) -> str:
    """The file a training run writes just before its first step."""
    return os.path.join(output_dir, "train_config.json")


# ---- precompute checks


def committed(cache: str) -> dict[str, Counter]:
    """Feature set path (`kind/fingerprint`) -> how many manifests commit each key, read from the JSON files."""
    out: dict[str, Counter] = {}
    for path in glob.glob(os.path.join(cache, "manifest", "*", "*", "*.json")):
        fset = os.path.relpath(os.path.dirname(path), os.path.join(cache, "manifest"))
        with open(path) as f:
            out.setdefault(fset, Counter()).update(list(json.load(f)["entries"]))
    return out


def planned_keys(cache: str) -> dict[str, set[str]]:
    """Feature kind -> keys the plans ask for: clip keys for latents and teacher, text keys for text."""
    clips = []
    for path in glob.glob(os.path.join(cache, "plans", "*.json")):
        with open(path) as f:
            clips += json.load(f)["clips"]
    keys = {c["key"] for c in clips}
    return {"latents": keys, "teacher": keys, "text": {c["text_key"] for c in clips}}


def read_entries(cache: str) -> dict[tuple[str, str, str], np.ndarray]:
    """(feature set, key, array name) -> the committed array, read with plain zarr from the manifests' rows."""
    out = {}
    for path in glob.glob(os.path.join(cache, "manifest", "*", "*", "*.json")):
        fset = os.path.relpath(os.path.dirname(path), os.path.join(cache, "manifest"))
        with open(path) as f:
            manifest = json.load(f)
        prefix = os.path.join(cache, fset, manifest["group"], manifest["segment"])
        for name, spec in manifest["arrays"].items():
            array = zarr.open_array(os.path.join(prefix, name), mode="r")
            offsets = zarr.open_array(os.path.join(prefix, f"{name}.offsets"), mode="r")[:] if spec["ragged"] else None
            for key, entry in manifest["entries"].items():
                row = entry["row"]
                out[fset, key, name] = array[offsets[row]:offsets[row + 1]] if spec["ragged"] else array[row]
    return out


def precompute_problems(cache: str, reference: str) -> list[str]:
    """What is wrong with a finished cache, compared with the uninterrupted run's."""
    from crepa.cache.store import CacheStore

    problems = []
    counts, want = committed(cache), committed(reference)
    if set(counts) != set(want):
        problems.append(f"feature sets {sorted(counts)} != {sorted(want)}")
    plan = planned_keys(cache)
    for fset, keys in counts.items():
        doubled = sorted(k for k, n in keys.items() if n > 1)
        missing = sorted(plan[fset.split("/")[0]] - set(keys))
        problems += [f"{fset}: {key} committed {keys[key]} times" for key in doubled]
        problems += [f"{fset}: planned {key} never committed" for key in missing]
    problems += CacheStore.open(cache).verify().problems
    got, expected = read_entries(cache), read_entries(reference)
    if set(got) != set(expected):
        problems.append(f"entries differ: {sorted(set(got) ^ set(expected))[:4]} ...")
    for name in sorted(set(got) & set(expected)):
        if got[name].shape != expected[name].shape or not np.array_equal(got[name], expected[name]):
            problems.append(f"{'/'.join(name)} differs from the uninterrupted run")
    return problems


def precompute_trial(setup: Setup, out: str, delay: float, segment_clips: int | None,
                     after: Callable[[], bool] | None = None) -> tuple[str, list[str]]:
    """Kill precompute (see `run_and_kill`), rerun it to the end; returns where the kill landed and what is wrong."""
    shutil.rmtree(out, ignore_errors=True)
    killed = run_and_kill(precompute_argv(setup, out, segment_clips), delay, after)
    done = {fset.split("/")[0]: len(keys) for fset, keys in committed(out).items()}
    landed = f"killed with {done or 'nothing'} committed" if killed else "ended before the kill"
    run_to_end(precompute_argv(setup, out, segment_clips))
    return landed, precompute_problems(out, setup.reference_cache)


# ---- train checks


def checkpoints(output_dir: str) -> list[str]:
    """Folder names `checkpoint-*` (complete or temporary) in a run's folder."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*")))


def train_problems(output_dir: str, reference: str) -> list[str]:
    """What is wrong with a finished run, compared with the uninterrupted one."""
    problems = [f"{name} left behind" for name in checkpoints(output_dir) if not name.rsplit("-", 1)[1].isdigit()]
    for weights in ("pytorch_lora_weights.safetensors", "crepa_projector.safetensors"):
        got, want = load_file(os.path.join(output_dir, weights)), load_file(os.path.join(reference, weights))
        if set(got) != set(want):
            problems.append(f"{weights}: tensor names differ")
            continue
        worst = max(float(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)).max()) for k in want)
        if worst > ATOL:
            problems.append(f"{weights}: differs from the uninterrupted run by up to {worst:.3g}")
    return problems


def train_trial(setup: Setup, output_dir: str, delay: float,
                after: Callable[[], bool] | None = None) -> tuple[str, list[str]]:
    """Kill training (see `run_and_kill`), resume from the latest checkpoint (or start afresh); returns where the
    kill landed and what is wrong."""
    shutil.rmtree(output_dir, ignore_errors=True)
    killed = run_and_kill(train_argv(setup, output_dir, resume=False), delay, after)
    left = checkpoints(output_dir)
    landed = f"killed leaving {left or 'no checkpoint'}" if killed else "ended before the kill"
    resume = any(name.rsplit("-", 1)[1].isdigit() for name in left)
    run_to_end(train_argv(setup, output_dir, resume=resume))
    return landed, train_problems(output_dir, setup.reference_run)


# ---- the script


def run_trials(setup: Setup, precompute: int, train: int, seed: int) -> tuple[int, int]:
    """Run the trials with delays drawn from `seed`; returns how many of each passed."""
    rng = random.Random(seed)
    passed = {"precompute": 0, "train": 0}
    for i in range(precompute):
        delay = rng.uniform(0.0, setup.precompute_seconds)
        segment_clips = 1 if i % 2 == 0 else None
        landed, problems = precompute_trial(setup, str(setup.root / "cache"), delay, segment_clips)
        _report("precompute", i, f"delay {delay:.2f} s, segment clips {segment_clips or 'default'}, {landed}",
                problems)
        passed["precompute"] += not problems
    output_dir = str(setup.root / "run")
    for i in range(train):
        # start-up (imports, model load) is most of a tiny run: every other kill is drawn over the loop alone
        in_loop = i % 2 == 1
        delay = rng.uniform(0.0, setup.train_loop_seconds if in_loop else setup.train_seconds)
        after = (lambda: os.path.exists(loop_started(output_dir))) if in_loop else None
        landed, problems = train_trial(setup, output_dir, delay, after)
        _report("train", i, f"delay {delay:.2f} s{' into the loop' if in_loop else ''}, {landed}", problems)
        passed["train"] += not problems
    return passed["precompute"], passed["train"]


def _report(stage: str, i: int, what: str, problems: list[str]) -> None:
    print(f"{stage} trial {i}: {what}: {'ok' if not problems else 'FAILED'}", flush=True)
    for problem in problems[:10]:
        print(f"    {problem}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precompute", type=int, default=20, help="precompute trials")
    parser.add_argument("--train", type=int, default=10, help="training trials")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--clips", type=int, default=8, help="clips in the dataset")
    parser.add_argument("--workdir", help="folder for models, caches and runs (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # the script runs from tests/; the project's packages live at the root
    root = Path(args.workdir or tempfile.mkdtemp(prefix="crepa-kill-"))
    start = time.perf_counter()
    setup = make_setup(root, clips=args.clips)
    prepare_references(setup, train=args.train > 0)
    print(f"seed {args.seed}; uninterrupted precompute {setup.precompute_seconds:.1f} s, train "
          f"{setup.train_seconds:.1f} s ({setup.train_loop_seconds:.1f} s in the loop); work in {root}", flush=True)
    ok_pre, ok_train = run_trials(setup, args.precompute, args.train, args.seed)
    print(f"precompute: {ok_pre}/{args.precompute} ok, train: {ok_train}/{args.train} ok "
          f"({time.perf_counter() - start:.0f} s)")
    return 0 if (ok_pre, ok_train) == (args.precompute, args.train) else 1


if __name__ == "__main__":
    sys.exit(main())
