"""What one LoRA training step holds on the GPU, and which settings fit 24 GB and 16 GB cards.

A memory model for Wan 2.1 1.3B and 14B, LTX-Video 0.9, SANA-Video 2B and Kandinsky 5 T2V Lite training on
81x480x832 clips (batch 1) with the trainer's defaults (LoRA rank 16 on the attention projections, CREPA on block 8
against DINOv2-g features, AdamW), gradient checkpointing on, a bf16 or fp8 base and 0 to all blocks swapped
(`--blocks-to-swap`); where nothing fits a 24 GB card, also on shorter clips. The predicted peak is the sum of
- the frozen weights on the device: counted on the meta device as the trainer prepares them (from_pretrained's
  dtypes, then `prepare_base`), less the swapped blocks' except two (the one computing, the next arriving);
- the trainable weights (LoRA, projector) in fp32 and their two AdamW moments;
- what the step itself allocates at its peak: every checkpointed block's saved input, one block's recompute and
  backward, the CREPA projector and scores, the gradients. Counted by running the step on fake tensors (real shapes
  and dtypes, no data) under `TensorBytes`, so what the kernels really keep (attention's saved outputs, LoRA's fp32
  copies of its input) counts; on a GPU the flash/efficient attention kernels keep the same O(tokens) tensors as the
  CPU's flash kernel this runs.

Check: on scaled configs (real widths, 2 blocks, small latents) the same step runs for real on this CPU, in a fresh
process, twice; the RSS growth over the second step is compared with the model's prediction for that config.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.common import TensorBytes, markdown_table, parser, record, status_bytes
from bench.precision import as_loaded
from bench.real_configs import KANDINSKY5_T2V_LITE, LTX_VIDEO_2B, SANA_VIDEO_2B, WAN_1_3B, WAN_14B
from crepa.loss import crepa_scores
from crepa.projector import CrepaProjector
from train.config import TrainConfig
from train.lora import add_lora
from train.precision import LOAD_DTYPE, base_bytes, prepare_base

CREPA_BLOCK = 8
"""The block CREPA reads (wan, ltxvideo and kandinsky5_video's default; sanavideo's 10 saves the same activations)."""

GIB, MIB = 2**30, 2**20
TEACHER_DIM = 1536  # DINOv2-g
CARDS_GIB = (24, 16)
RESERVE_GIB = 1.0
"""Device memory outside the allocator's tensors: CUDA context, cuBLAS workspace, fragmentation."""
BASE_DTYPES = ("bf16", "fp8")


def _wan_inputs(config: dict, grid: tuple[int, int, int], text: int) -> dict:
    return dict(hidden_states=torch.randn(1, config["in_channels"], *grid), timestep=torch.full((1,), 500.0),
                encoder_hidden_states=torch.randn(1, text, config["text_dim"]), return_dict=False)


def _ltx_inputs(config: dict, grid: tuple[int, int, int], text: int) -> dict:
    frames, height, width = grid  # packed (B, N, C) as the pipeline's _pack_latents gives them (patch 1)
    return dict(hidden_states=torch.randn(1, frames * height * width, config["in_channels"]),
                encoder_hidden_states=torch.randn(1, text, config["caption_channels"]),
                timestep=torch.full((1,), 500.0), encoder_attention_mask=torch.ones(1, text), num_frames=frames,
                height=height, width=width, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def _sana_inputs(config: dict, grid: tuple[int, int, int], text: int) -> dict:
    return dict(hidden_states=torch.randn(1, config["in_channels"], *grid),
                encoder_hidden_states=torch.randn(1, text, config["caption_channels"]),
                encoder_attention_mask=torch.ones(1, text), timestep=torch.full((1,), 500.0), return_dict=False)


def _kandinsky_inputs(config: dict, grid: tuple[int, int, int], text: int) -> dict:
    frames, height, width = grid  # channels-last, latents + conditioning copy + mask
    channels = 2 * config["in_visual_dim"] + 1 if config["visual_cond"] else config["in_visual_dim"]
    _, patch_h, patch_w = config["patch_size"]
    return dict(hidden_states=torch.randn(1, frames, height, width, channels),
                encoder_hidden_states=torch.randn(1, text, config["in_text_dim"]), timestep=torch.full((1,), 500.0),
                pooled_projections=torch.randn(1, config["in_text_dim2"]),
                visual_rope_pos=[torch.arange(frames), torch.arange(height // patch_h), torch.arange(width // patch_w)],
                text_rope_pos=torch.arange(text), scale_factor=(1.0, 2.0, 2.0), return_dict=False)


@dataclass(frozen=True)
class Model:
    """One architecture and what its pipeline feeds it."""

    label: str
    class_name: str
    config: dict
    blocks: str
    """Attribute holding the block list (the one gradient checkpointing and block swap work on)."""
    depth_key: str
    lora_targets: list[str] | str
    compression: tuple[int, int]
    """VAE (temporal, spatial) compression."""
    patch: tuple[int, int, int]
    text_tokens: int
    inputs: Callable[[dict, tuple[int, int, int], int], dict]
    scaled: dict = field(default_factory=dict)
    """Config changes for the CPU check: 2 blocks, the rest real."""

    def build(self, base_dtype: str, **changes) -> torch.nn.Module:
        """The transformer as the trainer prepares it: narrow load, LoRA, base precision, checkpointing."""
        import diffusers

        model = as_loaded(getattr(diffusers, self.class_name)(**(self.config | changes)), LOAD_DTYPE[base_dtype])
        add_lora(model, TrainConfig().lora_rank, TrainConfig().lora_rank, 0.0, self.lora_targets)
        prepare_base(model, base_dtype)
        model.enable_gradient_checkpointing()
        return model.train()

    def grid(self, video: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (frames, height, width) of a clip of `video` pixels (frames, height, width)."""
        temporal, spatial = self.compression
        return 1 + (video[0] - 1) // temporal, video[1] // spatial, video[2] // spatial

    def tokens(self, video: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(size // patch for size, patch in zip(self.grid(video), self.patch, strict=True))


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
MODELS = [
    Model("Wan 2.1 1.3B", "WanTransformer3DModel", WAN_1_3B, "blocks", "num_layers", ATTENTION, (4, 8), (1, 2, 2),
          512, _wan_inputs),
    Model("Wan 2.1 14B", "WanTransformer3DModel", WAN_14B, "blocks", "num_layers", ATTENTION, (4, 8), (1, 2, 2), 512,
          _wan_inputs),
    Model("LTX-Video 0.9", "LTXVideoTransformer3DModel", LTX_VIDEO_2B, "transformer_blocks", "num_layers", ATTENTION,
          (8, 32), (1, 1, 1), 128, _ltx_inputs),
    Model("SANA-Video 2B", "SanaVideoTransformer3DModel", SANA_VIDEO_2B, "transformer_blocks", "num_layers", ATTENTION,
          (4, 8), (1, 2, 2), 300, _sana_inputs),
    Model("Kandinsky 5 T2V Lite", "Kandinsky5Transformer3DModel", KANDINSKY5_T2V_LITE, "visual_transformer_blocks",
          "num_visual_blocks", r".*(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)", (4, 8),
          (1, 2, 2), 256, _kandinsky_inputs),
]


def teacher_grid(video: tuple[int, int, int]) -> tuple[int, int]:
    from precompute.config import TeacherSettings
    from precompute.teacher import teacher_grid as grid

    return grid(video[1], video[2], TeacherSettings(encoder="dinov2_vitg14", image_size=518), patch=14)


def training_step(model: torch.nn.Module, spec: Model, projector: torch.nn.Module, video: tuple[int, int, int],
                  block_index: int) -> None:
    """Forward, flow loss, CREPA on `block_index`'s output, backward: what `train.trainer.train_step` does, for a
    model of any of these families (the trainer reaches them through their adapters)."""
    kept = {}
    blocks = getattr(model, spec.blocks)
    handle = blocks[block_index].register_forward_hook(
        lambda _m, _a, out: kept.update(tokens=out[0] if isinstance(out, tuple) else out))
    try:
        output = model(**spec.inputs(spec.config, spec.grid(video), spec.text_tokens))
    finally:
        handle.remove()
    prediction = output[0] if isinstance(output, tuple) else output
    flow = F.mse_loss(prediction.float(), torch.zeros(prediction.shape))
    student = kept.pop("tokens").reshape(1, *spec.tokens(video), -1)  # (B, F, hs, ws, D)
    teacher = torch.randn(1, spec.tokens(video)[0], *teacher_grid(video), TEACHER_DIM).to(torch.float16)
    scores = crepa_scores(projector(student), teacher.float())
    (flow - 0.5 * scores.per_video.mean()).backward()


@dataclass
class Prediction:
    weights: int
    """Frozen weights and buffers, all blocks on the device."""
    block: int
    """Frozen weights of one block."""
    blocks: int
    trainable: int
    """LoRA and projector parameters."""
    step: int
    """Peak of what the step allocates."""

    def peak(self, swapped: int) -> int:
        """Device bytes at the step's peak with `swapped` blocks on the host."""
        resident = self.weights - (swapped - min(swapped, 2)) * self.block
        return resident + self.trainable * 4 * 3 + self.step  # fp32 weights + two AdamW moments


def _fake(module: torch.nn.Module, mode) -> None:
    """Replace every meta parameter, buffer and plain tensor attribute by a fake CPU tensor of its shape and dtype."""

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty(tensor.shape, dtype=tensor.dtype)

    for child in module.modules():
        for name, param in list(child._parameters.items()):
            if param is not None:
                child._parameters[name] = torch.nn.Parameter(fake(param), requires_grad=param.requires_grad)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[name] = fake(buffer)
        for name, value in list(vars(child).items()):  # e.g. Kandinsky's time-embedding frequencies
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(child, name, fake(value))


@functools.cache
def _fake_mode():
    """One fake-tensor mode for the process: tensors the code under test caches (crepa.loss's resampling matrices)
    are fake tensors of the first mode that made them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def predict(spec: Model, base_dtype: str, video: tuple[int, int, int], **changes) -> Prediction:
    """Count a model's weights on the meta device and its step's allocations on fake tensors."""
    with torch.device("meta"):
        model = spec.build(base_dtype, **changes)
        projector = CrepaProjector(_width(model), TEACHER_DIM)
    blocks = getattr(model, spec.blocks)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad) for b in blocks)
    trainable = sum(p.numel() for m in (model, projector) for p in m.parameters() if p.requires_grad)
    weights = base_bytes(model)
    mode = _fake_mode()
    _fake(model, mode)
    _fake(projector, mode)
    with mode, TensorBytes() as count:
        training_step(model, spec, projector, video, min(CREPA_BLOCK, len(blocks) - 1))
    return Prediction(weights, block, len(blocks), trainable, count.peak)


def _width(model: torch.nn.Module) -> int:
    config = model.config
    return config.get("model_dim") or config.num_attention_heads * config.attention_head_dim


def measure(args) -> None:
    """Child process: the scaled step for real on the CPU, twice; prints the RSS growth over the second step."""
    spec = next(m for m in [*MODELS, _tiny()] if m.label == args.measure)
    video = tuple(args.video)
    torch.manual_seed(0)
    model = spec.build("bf16", **_scaled(spec))
    projector = CrepaProjector(_width(model), TEACHER_DIM)
    block = min(CREPA_BLOCK, len(getattr(model, spec.blocks)) - 1)
    training_step(model, spec, projector, video, block)  # kernels' one-time set-up, thread pools
    for param in [*model.parameters(), *projector.parameters()]:
        param.grad = None
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS
        f.write("5")
    with TensorBytes() as count:
        training_step(model, spec, projector, video, block)
    print(json.dumps({"rss": status_bytes("VmHWM") - before, "tensors": count.peak}))


def _scaled(spec: Model) -> dict:
    return {spec.depth_key: 2}


def check(spec: Model, video: tuple[int, int, int]) -> dict:
    """Predicted against measured step bytes on the scaled config."""
    command = [sys.executable, "-m", "bench.memory", "--measure", spec.label, "--video", *map(str, video),
               "--no-record"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # RSS follows live buffers (see precompute_memory.py)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    predicted = predict(spec, "bf16", video, **_scaled(spec)).step
    return {"predicted": predicted, **measured}


def fitting(prediction: Prediction, card_gib: int) -> int | None:
    """Fewest swapped blocks with which the step fits a card of `card_gib`; None when none does."""
    for swapped in range(prediction.blocks + 1):
        if prediction.peak(swapped) + RESERVE_GIB * GIB <= card_gib * GIB:
            return swapped
    return None


def main() -> None:
    args = _arguments()
    if args.measure:
        measure(args)
        return
    video, check_video, shorter = SCALES[args.scale]
    models = MODELS if args.scale == "full" else [_tiny()]
    predictions = {(spec.label, dtype): predict(spec, dtype, video) for spec in models for dtype in BASE_DTYPES}
    short = {}  # settings that fit no 24 GB card: shorter clips, until one fits 16 GB
    for spec in models:
        for dtype in BASE_DTYPES:
            if fitting(predictions[spec.label, dtype], CARDS_GIB[0]) is not None:
                continue
            for clip in shorter:
                short[spec.label, dtype, clip] = predict(spec, dtype, clip)
                if fitting(short[spec.label, dtype, clip], CARDS_GIB[-1]) is not None:
                    break
    architectures: dict[str, Model] = {}
    for spec in models:  # one check per architecture, on its first (smallest) model
        architectures.setdefault(spec.class_name, spec)
    checks = {spec.label: check(spec, check_video) for spec in architectures.values()}
    record("Training memory model", _report(predictions, short, checks, video, check_video),
           enabled=not args.no_record)


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _fits(p: Prediction) -> list[str]:
    """Per card: no, yes, or yes with the fewest swapped blocks that fit."""
    return ["no" if n is None else f"yes, swap {n}" if n else "yes" for n in (fitting(p, card) for card in CARDS_GIB)]


def _report(predictions: dict, short: dict, checks: dict, video: tuple, check_video: tuple) -> str:
    rows, swaps = [], []
    for (label, dtype), p in predictions.items():
        fits = [fitting(p, card) for card in CARDS_GIB]
        rows.append([label, dtype, _gib(p.weights), f"{p.trainable / 1e6:.0f} M: {_gib(p.trainable * 12)}",
                     _gib(p.step), _gib(p.peak(0)), _gib(p.peak(p.blocks)), *_fits(p)])
        for swapped in sorted({0, p.blocks // 4, p.blocks // 2, 3 * p.blocks // 4, p.blocks, *(n for n in fits if n)}):
            fit = ["yes" if p.peak(swapped) + RESERVE_GIB * GIB <= card * GIB else "no" for card in CARDS_GIB]
            swaps.append([label, dtype, f"{swapped} / {p.blocks}", _gib(p.peak(swapped)), _gib(swapped * p.block),
                          *fit])
    short_rows = [[label, dtype, "x".join(map(str, clip)), _gib(p.step), _gib(p.peak(0)), _gib(p.peak(p.blocks)),
                   *_fits(p)] for (label, dtype, clip), p in short.items()]
    check_rows = [[label, f"{c['predicted'] / MIB:,.0f}", f"{c['tensors'] / MIB:,.0f}", f"{c['rss'] / MIB:,.0f}",
                   f"{(c['predicted'] - c['rss']) / c['rss']:+.1%}"] for label, c in checks.items()]
    cards = " / ".join(f"{card} GB" for card in CARDS_GIB)
    return (
        f"Peak device memory of one LoRA training step, predicted (GiB): batch 1 of {video[0]}x{video[1]}x{video[2]} "
        f"pixels, LoRA rank {TrainConfig().lora_rank} on attention, CREPA on block {CREPA_BLOCK} "
        "against DINOv2-g, AdamW, gradient checkpointing on. Fits: the peak plus "
        f"{RESERVE_GIB:.0f} GiB (CUDA context, workspaces, fragmentation) within the card; 'swap N': the fewest "
        "--blocks-to-swap that fit.\n\n"
        + markdown_table(["model", "base", "frozen weights", "trainable: fp32 + AdamW", "step allocations",
                          "peak, no swap", "peak, all swapped", *(f"fits {card} GB" for card in CARDS_GIB)], rows)
        + f"\n\nBy swapped blocks (host: pinned memory the swapped blocks take; {cards}):\n\n"
        + markdown_table(["model", "base", "swapped", "peak GiB", "host GiB", *(f"{c} GB" for c in CARDS_GIB)], swaps)
        + ("\n\nShorter clips, for the settings above that fit no 24 GB card (until one fits 16 GB):\n\n"
           + markdown_table(["model", "base", "clip", "step allocations", "peak, no swap", "peak, all swapped",
                             *(f"fits {card} GB" for card in CARDS_GIB)], short_rows) if short_rows else "")
        + f"\n\nCheck on this CPU: the step's allocations on scaled configs (real widths, 2 blocks, bf16 base, "
        f"{check_video[0]}x{check_video[1]}x{check_video[2]} pixels), predicted on fake tensors against a real run "
        "in a fresh process (second step): the tensors it allocated (the same count on real data) and its RSS "
        "growth (the allocator's view; relative error of the prediction against it).\n\n"
        + markdown_table(["model (scaled)", "predicted MiB", "real tensors MiB", "RSS growth MiB", "error vs RSS"],
                         check_rows)
    )


SCALES = {"full": ((81, 480, 832), (33, 256, 448), ((49, 480, 832), (33, 480, 832), (17, 480, 832))),
          "tiny": ((9, 64, 64), (9, 64, 64), ())}
"""(table clip, CPU check clip, shorter clips) as (frames, height, width) in pixels; tiny: the tiny Wan, for smoke
runs."""


def _tiny() -> Model:
    """The test suite's tiny Wan, for smoke runs."""
    from crepa.families import get_family

    config = get_family("wan").tiny_transformer_config()
    return Model("tiny Wan", "WanTransformer3DModel", config, "blocks", "num_layers", ATTENTION, (4, 8), (1, 2, 2), 8,
                 _wan_inputs)


def _arguments():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scale", choices=SCALES, default="full")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--video", type=int, nargs=3, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
