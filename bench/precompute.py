"""Precompute throughput and efficiency, and the DINOv2 compute dtype's speed and accuracy.

What it measures:
1. `run_precompute` (the product's real pipeline) on real mp4 clips written with `precompute.synthetic`, through the
   real architectures with random weights saved with `save_pretrained` (Wan VAE, UMT5 of real width, DINOv2-g):
   clips/s, frames/s, seconds in each model's forwards, and the efficiency = forward seconds / (wall seconds - model
   loading). Why: precompute should be bound by its models, with decoding and writing hidden behind them; the goal
   on a GPU is an efficiency above 0.9.
2. DINOv2 compute dtype fp32 vs bf16 vs fp16 through `TeacherEncoder.frame_features`, side by side: frames/s, and the
   token cosine similarity of the features to fp32 (mean and min). Why: the teacher's dtype trades speed for the
   fidelity of the stored features.

The default preset is sized for 2 CPU cores (a few minutes; models scaled down in depth, never in width); `--scale
full` is the real size for a GPU: 81 frames at 480x832, DINOv2-g with 40 layers at 518, 24-layer UMT5.

Heavy modules are imported inside functions: decode workers are spawned and re-import this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from precompute.pipeline import PrecomputeSummary

SLOW_FACTOR = 20.0
"""A dtype whose first call is this many times slower than fp32's is reported, not timed."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one run: clips, models (depth only), and the dtype comparison."""

    clips: int
    frames: int
    height: int
    width: int
    source_height: int
    source_width: int
    """Size of the written videos: larger than the bucket, so decoding also resizes, as with real sources."""
    dinov2_layers: int
    image_size: int
    umt5_layers: int
    text_max_length: int | None
    segment_clips: int
    """Clips per segment: small at small sizes so segments are written during the run, as 256 MB segments of
    full-size teacher features (~90 MB per clip) are."""
    weights_dtype: str
    dtype_frames: int
    rounds: int


PRESETS = {
    "small": Preset(clips=6, frames=17, height=64, width=112, source_height=128, source_width=224, dinov2_layers=4,
                    image_size=112, umt5_layers=1, text_max_length=64, segment_clips=2, weights_dtype="float32",
                    dtype_frames=4, rounds=3),
    "full": Preset(clips=16, frames=81, height=480, width=832, source_height=720, source_width=1280,
                   dinov2_layers=40, image_size=518, umt5_layers=24, text_max_length=None, segment_clips=64,
                   weights_dtype="bfloat16", dtype_frames=21, rounds=5),
}


def save_models(root: Path, preset: Preset, device: torch.device) -> dict[str, str]:
    """A Wan pipeline folder (vae/, text_encoder/, tokenizer/, transformer/config.json) and a DINOv2-g folder."""
    import torch

    from bench.real_configs import WAN_1_3B, save_dinov2, umt5_encoder, wan_vae
    from crepa.families.loading import resolve_dtype
    from crepa.tiny_models import tiny_tokenizer

    pipeline = root / "wan"
    dtype = resolve_dtype(preset.weights_dtype)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU when there is one: seconds instead of minutes
        wan_vae().save_pretrained(pipeline / "vae")
        tokenizer = tiny_tokenizer()
        tokenizer.save_pretrained(pipeline / "tokenizer")
        umt5_encoder(preset.umt5_layers, len(tokenizer)).to(dtype).save_pretrained(pipeline / "text_encoder")
        encoder = save_dinov2(str(root / "dinov2_vitg14"), "dinov2_vitg14", preset.dinov2_layers)
    # The transformer's config alone: precompute reads its patch size, never its weights.
    (pipeline / "transformer").mkdir()
    config = {"_class_name": "WanTransformer3DModel", **WAN_1_3B}
    (pipeline / "transformer" / "config.json").write_text(json.dumps(config, default=list))
    return {"pipeline": str(pipeline), "encoder": encoder}


def write_dataset(root: Path, preset: Preset) -> str:
    """`preset.clips` moving-shape mp4 clips with captions and a dataset TOML with one bucket; returns its path."""
    from precompute.synthetic import DEMO_CAPTIONS, moving_shapes_clip, write_video

    clips = root / "clips"
    clips.mkdir()
    for index in range(preset.clips):
        video = moving_shapes_clip(preset.frames, preset.source_height, preset.source_width, seed=index)
        write_video(clips / f"clip_{index:03d}.mp4", video, fps=16)
        (clips / f"clip_{index:03d}.txt").write_text(DEMO_CAPTIONS[index % len(DEMO_CAPTIONS)])
    config = root / "dataset.toml"
    config.write_text(f'[general]\nresolutions = [[{preset.width}, {preset.height}]]\n'
                      f'target_frames = [{preset.frames}]\nframe_extraction = "head"\n\n'
                      '[[datasets]]\nname = "bench"\nvideo_directory = "clips"\n')
    return str(config)


def run_pipeline(root: Path, models: dict[str, str], dataset: str, preset: Preset,
                 device: torch.device) -> PrecomputeSummary:
    """One full precompute of the dataset into a fresh cache."""
    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute

    config = PrecomputeConfig(
        dataset_config=dataset, family="wan", out=str(root / "cache"), model=models["pipeline"], device=str(device),
        teacher=TeacherSettings(encoder=models["encoder"], image_size=preset.image_size),
        text_max_length=preset.text_max_length, segment_clips=preset.segment_clips,
    )
    return run_precompute(config)


def pipeline_rows(summary: PrecomputeSummary, preset: Preset) -> list[list[object]]:
    """One row per figure of the run: throughput, time split, efficiency."""
    clips = summary.computed["latents"]
    stage_wall = summary.wall_seconds - sum(summary.load_seconds.values())
    forwards = sum(summary.forward_seconds.values())
    rows = [
        ["clips", clips],
        ["clips/s (excluding model loading)", f"{clips / stage_wall:.3g}"],
        ["frames/s (excluding model loading)", f"{clips * preset.frames / stage_wall:.3g}"],
        ["wall s", f"{summary.wall_seconds:.2f}"],
        ["model loading s", f"{sum(summary.load_seconds.values()):.2f}"],
    ]
    rows += [[f"forward s: {name}", f"{seconds:.2f}"] for name, seconds in sorted(summary.forward_seconds.items())]
    rows += [["other s (decode wait, copies, writes, planning)", f"{stage_wall - forwards:.2f}"],
             ["other s per clip", f"{(stage_wall - forwards) / max(clips, 1):.3f}"],
             ["**efficiency** (forwards / (wall - loading))", f"**{summary.efficiency:.3f}**"]]
    return rows


def teacher_frames(preset: Preset) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]: frames of a synthetic clip at the preset's bucket size."""
    import torch

    from precompute.synthetic import moving_shapes_clip

    clip = moving_shapes_clip(preset.dtype_frames, preset.height, preset.width, seed=7)  # (N, H, W, 3) uint8
    return torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class DtypeResult:
    name: str
    seconds: list[float] = field(default_factory=list)
    """Seconds per frame_features call, one per round."""
    mean_cos: float = float("nan")
    min_cos: float = float("nan")
    note: str = ""
    """Why it was not timed, when it was not."""


def probe(encoder, frames: torch.Tensor) -> tuple[float | None, str]:
    """Seconds of one frame_features call, or None and why it failed."""
    from bench.common import synchronize

    start = time.perf_counter()
    try:
        encoder.frame_features(frames)
    except (RuntimeError, NotImplementedError) as error:
        return None, f"unsupported: {str(error).splitlines()[0][:80]}"
    synchronize(encoder.device)
    return time.perf_counter() - start, ""


def compare_dtypes(encoder_path: str, preset: Preset, device: torch.device) -> list[DtypeResult]:
    """fp32 vs bf16 vs fp16 DINOv2: interleaved timing, and token cosine similarity to fp32's features."""
    import torch
    import torch.nn.functional as F

    from bench.common import time_alternating
    from precompute.config import TeacherSettings
    from precompute.teacher import TeacherEncoder

    settings = TeacherSettings(encoder=encoder_path, image_size=preset.image_size)
    frames = teacher_frames(preset).to(device)
    results, encoders = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        encoder = TeacherEncoder(settings, device, dtype, batch_size=preset.dtype_frames)
        seconds, note = probe(encoder, frames)
        reference_seconds = results["fp32"].seconds[0] if results else seconds
        if seconds is not None and seconds > SLOW_FACTOR * reference_seconds:
            note = f"too slow to time: first call {seconds:.1f} s vs fp32 {reference_seconds:.1f} s"
        results[name] = DtypeResult(name, [seconds] if seconds is not None else [], note=note)
        if not note:
            encoders[name] = encoder
    times = time_alternating({name: lambda e=e: e.frame_features(frames) for name, e in encoders.items()},
                             rounds=preset.rounds, warmup=1, device=device)
    reference = encoders["fp32"].frame_features(frames)[0].flatten(0, 2)  # (N*ht*wt, D)
    for name, encoder in encoders.items():
        cosine = F.cosine_similarity(encoder.frame_features(frames)[0].flatten(0, 2), reference, dim=-1)
        results[name].seconds = times[name]
        results[name].mean_cos, results[name].min_cos = cosine.mean().item(), cosine.min().item()
    return list(results.values())


def dtype_rows(results: list[DtypeResult], frames: int) -> list[list[object]]:
    from bench.common import median, spread

    return [[r.name, spread(r.seconds), f"{frames / median(r.seconds):.3g}", f"{r.mean_cos:.6f}", f"{r.min_cos:.6f}",
             ""] if not r.note else [r.name, "-", "-", "-", "-", r.note] for r in results]


def dtype_sentence(results: list[DtypeResult]) -> str:
    """Speed of each timed dtype relative to fp32, with its worst token cosine."""
    from bench.common import median

    fp32 = median(results[0].seconds)
    parts = [f"{r.name} runs {fp32 / median(r.seconds):.2f}x fp32's speed (min token cosine {r.min_cos:.5f})"
             for r in results[1:] if not r.note]
    parts += [f"{r.name}: {r.note}" for r in results[1:] if r.note]
    return "DINOv2: " + "; ".join(parts) + "."


def main() -> None:
    import torch

    from bench.common import markdown_table, parser, record
    from precompute.models import precompute_device

    args = parser(__doc__.splitlines()[0])
    args.add_argument("--scale", choices=sorted(PRESETS), default="small", help="small: 2 CPU cores; full: a GPU")
    args.add_argument("--clips", type=int, help="override the preset's clip count")
    args.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    args = args.parse_args()
    preset = PRESETS[args.scale] if args.clips is None else replace(PRESETS[args.scale], clips=args.clips)
    device = precompute_device(args.device)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="crepa-bench-precompute-") as folder:
        root = Path(folder)
        models = save_models(root, preset, device)
        dataset = write_dataset(root, preset)
        summary = run_pipeline(root, models, dataset, preset, device)
        results = compare_dtypes(models["encoder"], preset, device)
    pipeline = markdown_table(["figure", "value"], pipeline_rows(summary, preset))
    dtypes = markdown_table(["DINOv2 dtype", "s per call [min, max]", "frames/s", "mean token cos vs fp32",
                             "min token cos vs fp32", "note"], dtype_rows(results, preset.dtype_frames))
    goal = "met" if summary.efficiency > 0.9 else "missed"
    body = (f"Preset `{args.scale}`: {preset.clips} clips of {preset.frames} frames at {preset.height}x{preset.width} "
            f"on {device}; Wan VAE, UMT5 ({preset.umt5_layers} layers), DINOv2-g ({preset.dinov2_layers} layers, "
            f"image size {preset.image_size}); random weights; {os.cpu_count()} CPUs seen.\n\n"
            f"{pipeline}\n\n{dtypes}\n\n"
            f"Efficiency {summary.efficiency:.3f}: the goal of 0.9 is {goal} on this machine (the goal is set for a "
            "GPU, where models are fast and decoding and writing are easiest to expose). "
            f"{dtype_sentence(results)} Frames/s and token cosines over {preset.dtype_frames} frames at "
            f"{preset.height}x{preset.width}, DINOv2 image size {preset.image_size}.")
    record("precompute pipeline efficiency and DINOv2 dtypes", body, enabled=not args.no_record)


if __name__ == "__main__":
    main()
