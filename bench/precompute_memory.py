"""Precompute's resident memory stays flat however many clips and dataset tables a run plans.

What it measures: peak RSS (VmHWM) of `run_precompute` in a fresh child process per variant, on webdataset
shards of encoded videos (the byte source whose videos could pile up in memory), through tiny random-weight models:
- the small run (`--clips-small` clips in one [[datasets]] table),
- the large run (`--clips-large` clips in one table),
- the same large run spread over `--tables` tables, one shard each.
Why: a run over a large dataset must not hold per-clip state (video bytes, decoded frames, outputs) for the whole
plan; the growth per extra clip should be near 0 and far below one video's size. Decode workers are separate
processes, so the figure is the main process, where plans, models and writers live.

Heavy modules are imported inside functions: decode workers are spawned and re-import this module.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import markdown_table, parser, record, status_bytes

VARIANTS = ("small", "large", "tables")


def write_inputs(workdir: Path, args) -> int:
    """Tiny models, and `clips_large` samples of one noisy video over shards of `per_shard`; returns its bytes."""
    import numpy as np
    import webdataset as wds

    from crepa.families import get_family
    from crepa.tiny_models import save_tiny_dinov2, save_tiny_pipeline
    from precompute.synthetic import write_video

    save_tiny_pipeline(get_family("wan"), str(workdir / "wan"))
    save_tiny_dinov2(str(workdir / "dinov2"))
    noise = np.random.default_rng(0).integers(0, 256, (9, args.height, args.width, 3), dtype=np.uint8)
    write_video(workdir / "noise.mp4", noise, fps=8)  # noise barely compresses: a large video per clip
    video = (workdir / "noise.mp4").read_bytes()
    for shard in range(args.clips_large // args.per_shard):
        with wds.TarWriter(str(workdir / f"shard-{shard:06d}.tar")) as writer:
            for i in range(args.per_shard):
                writer.write({"__key__": f"s{shard}_{i}", "mp4": video, "txt": f"noise {shard} {i}"})
    return len(video)


def dataset_config(workdir: Path, variant: str, args) -> Path:
    shards = sorted(p.name for p in workdir.glob("shard-*.tar"))
    general = '[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n'
    if variant == "tables":
        step = len(shards) // args.tables
        tables = [shards[i * step:(i + 1) * step] for i in range(args.tables)]
    else:
        tables = [shards[: args.clips_small // args.per_shard] if variant == "small" else shards]
    body = "".join(f'\n[[datasets]]\nname = "t{i}"\nwebdataset = {json.dumps(table)}\n'
                   for i, table in enumerate(tables))
    path = workdir / f"{variant}.toml"
    path.write_text(general + body)
    return path


def measure(args) -> None:
    """Child process: one precompute run into a fresh cache; prints clips and peak RSS as JSON."""
    import contextlib

    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute

    workdir = Path(args.workdir)
    config = PrecomputeConfig(
        dataset_config=str(dataset_config(workdir, args.child, args)), family="wan",
        out=str(workdir / f"cache-{args.child}"), model=str(workdir / "wan"), device="cpu", decode_workers=1,
        teacher=TeacherSettings(encoder=str(workdir / "dinov2"), image_size=56), segment_clips=16)
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        summary = run_precompute(config)
    print(json.dumps({"clips": summary.computed["latents"], "peak": status_bytes("VmHWM")}))


def in_child(variant: str, workdir: str, args) -> dict:
    command = [sys.executable, "-m", "bench.precompute_memory", "--child", variant, "--workdir", workdir,
               "--clips-small", str(args.clips_small), "--clips-large", str(args.clips_large),
               "--tables", str(args.tables), "--per-shard", str(args.per_shard), "--no-record"]
    # A fixed mmap threshold turns off glibc's adaptive one, which otherwise keeps freed buffers of up to 32 MiB
    # resident at random: with it, RSS follows live buffers and repeats within a few MiB from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _arguments()
    if args.child:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="crepa-bench-") as workdir:
        video_bytes = write_inputs(Path(workdir), args)
        results = {variant: in_child(variant, workdir, args) for variant in VARIANTS}
    record("Precompute memory", _report(results, video_bytes, args), enabled=not args.no_record)


def _report(results: dict[str, dict], video_bytes: int, args) -> str:
    small = results["small"]
    mib = 2**20
    rows = []
    for variant, label in (("small", "1 table"), ("large", "1 table"), ("tables", f"{args.tables} tables")):
        result = results[variant]
        extra = result["clips"] - small["clips"]
        per_clip = f"{(result['peak'] - small['peak']) / extra / 1024:.1f}" if extra else "-"
        rows.append([f"{result['clips']} clips, {label}", f"{result['peak'] / mib:.0f}",
                     f"{result['peak'] / small['peak']:.3f}", per_clip])
    growth = (results["large"]["peak"] - small["peak"]) / (results["large"]["clips"] - small["clips"])
    return (
        f"Webdataset input, one {video_bytes / mib:.2f} MiB video ({args.height}x{args.width}, 9 frames of noise) per "
        f"sample, {args.per_shard} samples per shard; tiny Wan + DINOv2, CPU, 1 decode worker; peak RSS (VmHWM) of "
        "the main process, one fresh child process per variant.\n\n"
        + markdown_table(["run", "peak RSS MiB", "vs small", "KiB per extra clip"], rows)
        + f"\n\nGrowth per extra clip: {growth / 1024:.1f} KiB, {100 * growth / video_bytes:.2f}% of one video's "
        + ("bytes: no video is held for the plan; what grows is per-clip metadata (plan entries, the store's "
           "key index)." if growth < 0.1 * video_bytes else "bytes: videos are held for the whole plan.")
    )


def _arguments():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clips-small", type=int, default=50)
    p.add_argument("--clips-large", type=int, default=500)
    p.add_argument("--tables", type=int, default=20, help="tables the large run is spread over")
    p.add_argument("--per-shard", type=int, default=25)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
