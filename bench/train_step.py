"""What CREPA costs per training step: (a) no CREPA, (b) CREPA from the cache, (c) CREPA computed online.

(c) is how trainers without a teacher cache do it: the VAE decodes the clean latents and DINOv2
encodes the decoded frames inside every step, both models resident. All three run the product's
own `train.trainer.train_step` on a LoRA of the family's transformer (`--family`: Wan 2.1 T2V 1.3B or
LTX-Video 0.9 2B, real config, random weights) with an AdamW step; (b) and (c) differ only in where
the teacher features come from.

Time: one process builds every variant and alternates their steps. Memory: one fresh process per
variant holding only what that variant needs; peak RSS on a CPU, `max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import markdown_table, median, parser, record, spread, status_bytes, time_alternating
from bench.real_configs import (
    DINOV2,
    hunyuan_vae,
    kandinsky5_transformer,
    ltx_transformer,
    ltx_vae,
    sanavideo_transformer,
    save_dinov2,
    wan_transformer,
    wan_vae,
)
from crepa.families import Conditioning, FamilyAdapter, get_family
from crepa.projector import CrepaProjector
from crepa.schedule import CrepaWeightSchedule
from precompute.config import TeacherSettings
from precompute.teacher import TeacherEncoder, teacher_grid
from train.config import TrainConfig
from train.lora import add_lora
from train.trainer import StepParts, build_optimizer, train_step

VARIANTS = {"a": "no CREPA", "b": "CREPA from the cache", "c": "CREPA online (VAE decode + DINOv2 per step)"}
ENCODER = "dinov2_vitg14"
CAPTION_TOKENS = 120  # the caption's own tokens; the cache zero-pads them to the family's text length


@dataclass(frozen=True)
class Preset:
    """A step's size: `full` is the real one; `cpu` keeps every width and cuts depth and pixels alike."""

    dit_layers: int
    teacher_layers: int
    frames: int
    height: int
    width: int
    image_size: int
    """Teacher input side (equal-area, clip aspect), scaled with the clip's pixels."""
    gradient_checkpointing: bool
    rounds: int


@dataclass(frozen=True)
class RealFamily:
    """A family's real transformer and VAE (random weights) and its step sizes: `full` is its pipeline's clip."""

    title: str
    transformer: Callable[..., nn.Module]
    """(layers, dtype) -> the real transformer with `layers` blocks."""
    vae: Callable[..., nn.Module]
    """(dtype) -> the real VAE."""
    presets: dict[str, Preset]


FAMILIES = {
    "wan": RealFamily("Wan 2.1 1.3B", wan_transformer, wan_vae, {
        # 1/10 of the depth of both networks; 9x64x112 pixels; 518 px scaled by the same linear factor as the clip
        "cpu": Preset(dit_layers=3, teacher_layers=4, frames=9, height=64, width=112, image_size=70,
                      gradient_checkpointing=False, rounds=4),
        "full": Preset(dit_layers=30, teacher_layers=40, frames=81, height=480, width=832, image_size=518,
                       gradient_checkpointing=True, rounds=10),
    }),
    "ltxvideo": RealFamily("LTX-Video 0.9 2B", ltx_transformer, ltx_vae, {
        # 3 of 28 blocks; 17x128x224 pixels, the same 84 tokens as Wan's CPU step; 518 px scaled like the clip
        "cpu": Preset(dit_layers=3, teacher_layers=4, frames=17, height=128, width=224, image_size=140,
                      gradient_checkpointing=False, rounds=4),
        # LTXPipeline's default clip: 161 frames of 704x512, 21 x 16 x 22 latent tokens
        "full": Preset(dit_layers=28, teacher_layers=40, frames=161, height=512, width=704, image_size=518,
                       gradient_checkpointing=True, rounds=10),
    }),
    "sanavideo": RealFamily("SANA-Video 2B 480p", sanavideo_transformer, wan_vae, {
        # 2 of 20 blocks on Wan 2.1 VAE latents; the same clip as Wan's CPU step
        "cpu": Preset(dit_layers=2, teacher_layers=4, frames=9, height=64, width=112, image_size=70,
                      gradient_checkpointing=False, rounds=4),
        "full": Preset(dit_layers=20, teacher_layers=40, frames=81, height=480, width=832, image_size=518,
                       gradient_checkpointing=True, rounds=10),
    }),
    "kandinsky5_video": RealFamily("Kandinsky 5.0 T2V Lite", kandinsky5_transformer, hunyuan_vae, {
        # 3 of 32 visual blocks (both text blocks); the same clip as Wan's CPU step
        "cpu": Preset(dit_layers=3, teacher_layers=4, frames=9, height=64, width=112, image_size=70,
                      gradient_checkpointing=False, rounds=4),
        # 5 s at 24 fps, 512x768, as the pipeline's example generates: 31 x 32 x 48 latent tokens
        "full": Preset(dit_layers=32, teacher_layers=40, frames=121, height=512, width=768, image_size=518,
                       gradient_checkpointing=True, rounds=10),
    }),
}


def latent_shape(adapter: FamilyAdapter, real: RealFamily, preset: Preset, channels: int) -> tuple[int, ...]:
    """(1, C, f, h, w) latents of the preset's clip, by the real VAE's compression."""
    temporal, spatial = vae_compression(adapter, real)
    return 1, channels, 1 + (preset.frames - 1) // temporal, preset.height // spatial, preset.width // spatial


def vae_compression(adapter: FamilyAdapter, real: RealFamily) -> tuple[int, int]:
    """(temporal, spatial) compression from the real VAE's config (built on the meta device: no weights)."""
    with torch.device("meta"):
        return adapter.vae_compression(dict(real.vae().config))


def text_batch(adapter: FamilyAdapter, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """{'text' (1, L, D): a CAPTION_TOKENS caption zero-padded to the family's length, as the cache serves it,
    'text_mask', and 'text_pooled' (1, P) for families that take a pooled vector}."""
    length, dim = adapter.default_text_max_length, adapter.text_embedding_dim(transformer)
    text, mask = torch.zeros(1, length, dim), torch.zeros(1, length, dtype=torch.bool)
    text[:, :CAPTION_TOKENS] = torch.randn(1, CAPTION_TOKENS, dim)
    mask[:, :CAPTION_TOKENS] = True
    pooled = adapter.pooled_embedding_dim(transformer)
    return {"text": text, "text_mask": mask} | ({"text_pooled": torch.randn(1, pooled)} if pooled else {})


class StepBench:
    """The models and one batch for the given variants, and one optimizer step of each."""

    def __init__(self, family: str, preset: Preset, variants: str, device: torch.device, workdir: str,
                 lora_rank: int):
        self.device = device
        self.adapter = adapter = get_family(family)
        real = FAMILIES[family]
        self.compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        transformer = real.transformer(preset.dit_layers)
        add_lora(transformer, lora_rank, lora_rank, 0.0, list(adapter.default_lora_targets))
        if preset.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.transformer = transformer.to(device).train()
        self.compression = vae_compression(adapter, real)
        latents = torch.randn(latent_shape(adapter, real, preset, adapter.latent_channels(transformer)))
        latent_frames = latents.shape[2]
        self.batch = {"latents": latents, **text_batch(adapter, transformer)}

        settings = TeacherSettings(encoder=ENCODER, image_size=preset.image_size)
        crepa = set(variants) & {"b", "c"}
        hidden = adapter.hidden_dim(transformer)
        self.projector = CrepaProjector(hidden, DINOV2[ENCODER]["hidden_size"]).to(device) if crepa else None
        self.vae = self.teacher = None
        if "c" in variants:
            self.vae = real.vae(self.compute_dtype).to(device)
            folder = os.path.join(workdir, f"{ENCODER}-{preset.teacher_layers}layers")
            if not os.path.exists(os.path.join(folder, "config.json")):
                save_dinov2(folder, ENCODER, preset.teacher_layers)
            settings = TeacherSettings(encoder=folder, image_size=preset.image_size)
            self.teacher = TeacherEncoder(settings, device, self.compute_dtype, batch_size=latent_frames)
        if "b" in variants:  # what the cache serves: fp16 features of the clip's frames, on the host
            height, width = teacher_grid(preset.height, preset.width, settings, patch=14)
            cached = (self.online_teacher() if self.teacher is not None
                      else torch.randn(1, latent_frames, height, width, DINOV2[ENCODER]["hidden_size"]))
            self.batch["teacher"] = cached.to(torch.float16).cpu()
        if device.type == "cuda":
            self.batch = {name: value.pin_memory() for name, value in self.batch.items()}
        self.batch["keys"] = [f"clip{i}" for i in range(len(self.batch["latents"]))]

        block = min(adapter.default_crepa_block, preset.dit_layers - 1)
        self.parts = {name: self._parts(name != "a", block) for name in variants}
        self.optimizer = build_optimizer(next(iter(self.parts.values())).config, self.transformer, self.projector)
        self.step_index = 0

    def _parts(self, crepa: bool, block: int) -> StepParts:
        config = TrainConfig(crepa_enabled=crepa, crepa_block_index=block)
        return StepParts(self.adapter, self.transformer, self.projector, CrepaWeightSchedule(config.schedule_config()),
                         config, {}, vae_compression=self.compression)

    @torch.no_grad()
    def online_teacher(self) -> torch.Tensor:
        """(B, f, ht, wt, D): decode the clean latents, then DINOv2 on the frames each latent frame covers."""
        latents = self.batch["latents"].to(self.device, non_blocking=True)
        pixels = self.adapter.decode_latents(self.vae, latents)  # (B, 3, F, H, W) in [-1, 1]
        temporal = self.compression[0]
        features = [self.teacher.latent_features((clip.transpose(0, 1).float() + 1.0) / 2.0, temporal)[0]
                    for clip in pixels]
        return torch.stack(features)

    def step(self, variant: str) -> None:
        batch = self.batch
        if variant == "c":
            batch = {**batch, "teacher": self.online_teacher()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _ = train_step(self.parts[variant], batch, self.step_index, self.device)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def budget_bytes(self) -> int:
        """What the goal allows (b) over (a): the projector with grads and AdamW state, plus one teacher batch."""
        projector = sum(p.numel() for p in self.projector.parameters()) * 4 * 4
        teacher = self.batch["teacher"]
        return projector + teacher.numel() * (teacher.element_size() + 4)  # as cached, and its fp32 copy


def flop_counts(family: str, preset: Preset, lora_rank: int) -> dict[str, float]:
    """FLOPs of each variant's step at `preset`, counted on the meta device: no weights, no compute.

    (a) the LoRA DiT forward and backward (with the recomputed forward under checkpointing); (b) adds the
    projector and `crepa_scores` forward and backward; (c) adds the VAE decode and the DINOv2 forward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from bench.real_configs import dinov2
    from crepa.loss import crepa_scores
    from precompute.teacher import encoder_input_size

    adapter, real = get_family(family), FAMILIES[family]
    dim = DINOV2[ENCODER]["hidden_size"]
    settings = TeacherSettings(encoder=ENCODER, image_size=preset.image_size)
    teacher_h, teacher_w = teacher_grid(preset.height, preset.width, settings, patch=14)
    counts = {}
    with torch.device("meta"):
        transformer = real.transformer(preset.dit_layers)
        add_lora(transformer, lora_rank, lora_rank, 0.0, list(adapter.default_lora_targets))
        if preset.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        latents = torch.randn(latent_shape(adapter, real, preset, adapter.latent_channels(transformer)))
        conditioning = Conditioning(**text_batch(adapter, transformer), vae_compression=vae_compression(adapter, real))
        if not adapter.text_padding:  # the trainer hands such a family the caption's own tokens
            conditioning = conditioning.select(slice(None), CAPTION_TOKENS)
        kwargs = adapter.transformer_kwargs(transformer, latents, torch.ones(1), conditioning)
        with FlopCounterMode(display=False) as counter:
            adapter.prediction(transformer(**kwargs), latents.shape).float().square().mean().backward()
        counts["a"] = counter.get_total_flops()
        size = encoder_input_size(preset.height, preset.width, preset.image_size, "aspect", 14)
        latent_frames = latents.shape[2]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            adapter.decode_latents(real.vae(), latents)
            dinov2(ENCODER, preset.teacher_layers)(pixel_values=torch.randn(latent_frames, 3, *size))
        counts["c"] = counter.get_total_flops()
        grid, hidden = adapter.token_grid(transformer, latents.shape), adapter.hidden_dim(transformer)
    # the CREPA head on real CPU tensors: the projector's autocast guard does not run on the meta device
    student = torch.randn(1, *grid, hidden, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        projected = CrepaProjector(hidden, dim)(student)
        crepa_scores(projected, torch.randn(1, latent_frames, teacher_h, teacher_w, dim)).per_video.sum().backward()
    counts["b"] = counts["a"] + counter.get_total_flops()
    counts["c"] += counts["b"]
    return counts


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return status_bytes("VmHWM")


def measure_memory(args) -> None:
    """Child process: build one variant alone, run a few steps, print its peak memory as JSON."""
    device = torch.device(args.device)
    preset = FAMILIES[args.family].presets[args.scale]
    bench = StepBench(args.family, preset, args.memory_of, device, args.workdir, args.lora_rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        bench.step(args.memory_of)
    budget = bench.budget_bytes() if args.memory_of == "b" else 0
    print(json.dumps({"peak": peak_bytes(device), "budget": budget}))


def memory_in_subprocess(variant: str, args, workdir: str) -> dict:
    command = [sys.executable, "-m", "bench.train_step", "--memory-of", variant, "--family", args.family,
               "--scale", args.scale, "--device", args.device, "--workdir", workdir, "--lora-rank", str(args.lora_rank),
               "--no-record"]
    # A fixed mmap threshold turns off glibc's adaptive one, which otherwise keeps freed buffers of up to 32 MiB
    # resident at random: with it, RSS follows live tensors and repeats within a few MiB from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_steps(preset: Preset, device: torch.device, workdir: str, args) -> dict[str, list[float]]:
    """Seconds per step of each variant, alternated in this process (its models are freed on return)."""
    bench = StepBench(args.family, preset, "abc", device, workdir, args.lora_rank)
    return time_alternating({name: lambda name=name: bench.step(name) for name in VARIANTS},
                            args.rounds or preset.rounds, warmup=1, device=device)


def main() -> None:
    args = _arguments()
    if args.memory_of:
        measure_memory(args)
        return
    presets = FAMILIES[args.family].presets
    preset = presets[args.scale]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="crepa-bench-") as workdir:
        times = time_steps(preset, device, workdir, args)
        memory = {name: memory_in_subprocess(name, args, workdir) for name in VARIANTS}
    flops = {scale: flop_counts(args.family, presets[scale], args.lora_rank)
             for scale in dict.fromkeys((args.scale, "full"))}
    body = _report(preset, args, times, memory) + "\n\n" + _flops_report(args.family, flops)
    record(f"Train step ({args.family}, {args.scale})", body, enabled=not args.no_record)


def _flops_report(family: str, flops: dict[str, dict[str, float]]) -> str:
    rows = [[scale, *(f"{counts[name] / 1e12:,.3f}" for name in VARIANTS), f"{counts['b'] / counts['a']:.4f}",
             f"{counts['c'] / counts['b']:.2f}"] for scale, counts in flops.items()]
    table = markdown_table(["preset", "(a) TFLOP", "(b) TFLOP", "(c) TFLOP", "(b)/(a)", "(c)/(b)"], rows)
    full, preset = flops["full"], FAMILIES[family].presets["full"]
    return (f"FLOPs per step, counted with torch.utils.flop_counter on the meta device (no weights needed), "
            f"so the full-size step can be sized on any machine (full: {preset.dit_layers} blocks, "
            f"{preset.frames} frames x {preset.height}x{preset.width}):\n\n{table}\n\nAt full size the online teacher "
            f"adds {(full['c'] - full['b']) / 1e12:,.0f} TFLOP (VAE decode + DINOv2-g) to a "
            f"{full['b'] / 1e12:,.0f} TFLOP step; the cached teacher adds {(full['b'] - full['a']) / 1e12:.2f} TFLOP.")


def _report(preset: Preset, args, times: dict[str, list[float]], memory: dict[str, dict]) -> str:
    mib = 2**20
    rows = [[f"({name}) {VARIANTS[name]}", spread(times[name]), f"{median(times[name]) / median(times['a']):.3f}",
             f"{memory[name]['peak'] / mib:,.0f}", f"{(memory[name]['peak'] - memory['a']['peak']) / mib:+,.0f}"]
            for name in VARIANTS]
    table = markdown_table(["variant", "step s, median [min, max]", "time / (a)", "peak MiB", "MiB over (a)"], rows)
    time_ba = median(times["b"]) / median(times["a"])
    time_cb = median(times["c"]) / median(times["b"])
    memory_ba = memory["b"]["peak"] - memory["a"]["peak"]
    memory_cb = memory["c"]["peak"] / memory["b"]["peak"]
    budget = memory["b"]["budget"]
    kind = "peak RSS of the whole process" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    real = FAMILIES[args.family]
    setup = (f"{real.title} transformer with {preset.dit_layers} of {real.presets['full'].dit_layers} blocks, LoRA "
             f"rank {args.lora_rank} on attention, DINOv2-g/14 with {preset.teacher_layers} of 40 layers at "
             f"{preset.image_size} px, {real.title.split()[0]} VAE; "
             f"batch 1 x {preset.frames} frames x {preset.height}x{preset.width}; gradient checkpointing "
             f"{'on' if preset.gradient_checkpointing else 'off'}; {args.rounds or preset.rounds} alternated rounds; "
             f"memory is the {kind}.")
    verdict = (f"(b)/(a) time = {time_ba:.3f} (goal <= 1.03: {'met' if time_ba <= 1.03 else 'missed'}); "
               f"(c)/(b) time = {time_cb:.2f}; (c)/(b) memory = {memory_cb:.2f}. Memory of (b) over (a): "
               f"{memory_ba / mib:+.0f} MiB against a budget of {budget / mib:.0f} MiB (projector, its grads and "
               f"AdamW state, one teacher batch in fp16 and fp32): {'met' if memory_ba <= budget else 'missed'}.")
    return f"{setup}\n\n{table}\n\n{verdict}"


def _arguments():
    parser_ = parser(__doc__.splitlines()[0])
    parser_.add_argument("--family", choices=sorted(FAMILIES), default="wan")
    parser_.add_argument("--scale", choices=["cpu", "full"], default="full" if torch.cuda.is_available() else "cpu")
    parser_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser_.add_argument("--rounds", type=int, default=None, help="alternated rounds (default: the preset's)")
    parser_.add_argument("--lora-rank", type=int, default=32)
    parser_.add_argument("--memory-of", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser_.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser_.parse_args()


if __name__ == "__main__":
    main()
