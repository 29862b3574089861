"""Kandinsky 5 T2V: what CREPA costs per training step, and what the unpadded text costs.

Step: (a) no CREPA and (b) CREPA from the cache, alternated in one process on the product's own
`train.trainer.train_step`, a LoRA of the Kandinsky 5.0 T2V Lite transformer (real config, random weights,
visual blocks cut to a few) with an AdamW step. FLOPs of (a), (b) and (c) the online teacher (HunyuanVideo VAE
decode + DINOv2-g inside the step) at full size, Lite and Pro, counted on the meta device.

Text: the transformer takes no text mask, so the trainer runs clips whose captions differ in length as separate
forwards. Measured beside it on a batch of two such clips: one forward with the shorter caption zero-padded,
which is the most any batched alternative (a mask in every attention) could save, and how far that padding moves
the shorter clip's prediction. The other exact alternative, batches of one caption length only, is counted on the
trainer's own batch sampler: the clips an epoch leaves out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.common import markdown_table, median, parser, record, spread, time_alternating
from bench.real_configs import (
    DINOV2,
    KANDINSKY5_T2V_LITE,
    KANDINSKY5_T2V_PRO,
    dinov2,
    hunyuan_vae,
    kandinsky5_transformer,
)
from crepa.families import Conditioning, get_family
from crepa.families.kandinsky5_video import Kandinsky5VideoAdapter, randomise_modulation
from crepa.projector import CrepaProjector
from crepa.schedule import CrepaWeightSchedule
from precompute.config import TeacherSettings
from precompute.teacher import encoder_input_size, teacher_grid
from train.config import TrainConfig
from train.lora import add_lora
from train.trainer import StepParts, build_optimizer, train_step

FAMILY = "kandinsky5_video"
ENCODER = "dinov2_vitg14"
TEXT_DIM, POOLED_DIM = 3584, 768  # Qwen2.5-VL-7B hidden states, CLIP-L pooled
CAPTIONS = (120, 96)
"""Caption lengths in Qwen tokens of the two clips of the mixed batch (the first is also the one-clip batch's)."""
VARIANTS = {"a": "no CREPA, 1 clip", "b": "CREPA from the cache, 1 clip",
            "split": "CREPA, 2 clips of 120 and 96 tokens: 2 forwards (the trainer)",
            "padded": "CREPA, the same 2 clips in 1 forward, 96 padded to 120 (wrong without a mask)"}


@dataclass(frozen=True)
class Preset:
    visual_blocks: int | None
    """Visual blocks kept (None: all of the model's)."""
    frames: int
    height: int
    width: int
    image_size: int
    gradient_checkpointing: bool


PRESETS = {
    # 3 of 32 visual blocks (the text blocks whole); 9x64x112 pixels; the teacher side scaled like the clip's
    "cpu": Preset(visual_blocks=3, frames=9, height=64, width=112, image_size=70, gradient_checkpointing=False),
    # 5 s at 24 fps, 512x768: the size the pipeline's example generates
    "full": Preset(visual_blocks=None, frames=121, height=512, width=768, image_size=518, gradient_checkpointing=True),
}


def latent_frames(preset: Preset) -> int:
    return 1 + (preset.frames - 1) // 4


def batch_of(preset: Preset, captions: tuple[int, ...], teacher_grid_hw: tuple[int, int]) -> dict:
    """A collated batch as the cache serves it: text zero-padded to 512 with a prefix mask, fp16 teacher."""
    size = len(captions)
    text = torch.zeros(size, 512, TEXT_DIM)
    mask = torch.zeros(size, 512, dtype=torch.bool)
    for row, length in enumerate(captions):
        text[row, :length] = torch.randn(length, TEXT_DIM)
        mask[row, :length] = True
    return {"keys": [f"clip{i}" for i in range(size)],
            "latents": torch.randn(size, 16, latent_frames(preset), preset.height // 8, preset.width // 8),
            "text": text, "text_mask": mask, "text_pooled": torch.randn(size, POOLED_DIM),
            "teacher": torch.randn(size, latent_frames(preset), *teacher_grid_hw,
                                   DINOV2[ENCODER]["hidden_size"]).half()}


class PaddedKandinsky5(Kandinsky5VideoAdapter):
    """The family with its text padded like any other's: one forward per batch (the measured alternative)."""

    text_padding = True


class StepBench:
    def __init__(self, preset: Preset, lora_rank: int):
        self.adapter = get_family(FAMILY)
        torch.manual_seed(0)
        transformer = kandinsky5_transformer(preset.visual_blocks)
        randomise_modulation(transformer, std=0.02)  # zero modulation would make the text irrelevant
        add_lora(transformer, lora_rank, lora_rank, 0.0, list(self.adapter.default_lora_targets))
        self.transformer = transformer.train()
        settings = TeacherSettings(encoder=ENCODER, image_size=preset.image_size)
        grid = teacher_grid(preset.height, preset.width, settings, patch=14)
        two = batch_of(preset, CAPTIONS, grid)
        longest = max(CAPTIONS)  # the padded alternative pads to the batch's longest caption, not the cache's 512
        self.batches = {"a": batch_of(preset, CAPTIONS[:1], grid), "split": two,
                        "padded": two | {"text": two["text"][:, :longest], "text_mask": two["text_mask"][:, :longest]}}
        self.batches["b"] = self.batches["a"]
        self.projector = CrepaProjector(self.adapter.hidden_dim(transformer), DINOV2[ENCODER]["hidden_size"])
        block = min(8, preset.visual_blocks - 1)
        self.parts = {"a": self._parts(self.adapter, False, block), "b": self._parts(self.adapter, True, block),
                      "split": self._parts(self.adapter, True, block),
                      "padded": self._parts(PaddedKandinsky5(), True, block)}
        self.optimizer = build_optimizer(self.parts["a"].config, self.transformer, self.projector)
        self.step_index = 0

    def _parts(self, adapter, crepa: bool, block: int) -> StepParts:
        config = TrainConfig(crepa_enabled=crepa, crepa_block_index=block)
        return StepParts(adapter, self.transformer, self.projector, CrepaWeightSchedule(config.schedule_config()),
                         config, {})

    def step(self, variant: str) -> None:
        loss, _ = train_step(self.parts[variant], self.batches[variant], self.step_index, torch.device("cpu"))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    @torch.no_grad()
    def padding_shift(self) -> float:
        """RMS change of the shorter clip's prediction when its text is zero-padded to the longer caption's length,
        relative to the prediction's RMS (random weights: the size, not the sign, is what carries over)."""
        batch = self.batches["split"]
        noisy, timesteps = batch["latents"][1:], torch.tensor([600.0])
        conditioning = Conditioning.from_batch(batch, torch.device("cpu")).select(slice(1, 2))
        predictions = []
        for tokens in CAPTIONS[::-1]:  # its own 96 tokens, then padded to 120
            kwargs = self.adapter.transformer_kwargs(self.transformer, noisy, timesteps,
                                                     conditioning.select(slice(None), tokens))
            predictions.append(self.adapter.prediction(self.transformer(**kwargs), noisy.shape))
        own, padded = predictions
        return float((padded - own).square().mean().sqrt() / own.square().mean().sqrt())


def flop_counts(config: dict, preset: Preset, lora_rank: int) -> dict[str, float]:
    """FLOPs of (a), (b), (c) at `preset`, on the meta device (no weights, no compute), as in bench/train_step.py."""
    from torch.utils.flop_counter import FlopCounterMode

    from crepa.loss import crepa_scores

    adapter = get_family(FAMILY)
    frames = latent_frames(preset)
    dim, hidden = DINOV2[ENCODER]["hidden_size"], config["model_dim"]
    settings = TeacherSettings(encoder=ENCODER, image_size=preset.image_size)
    teacher_h, teacher_w = teacher_grid(preset.height, preset.width, settings, patch=14)
    counts = {}
    with torch.device("meta"):
        transformer = kandinsky5_transformer(preset.visual_blocks, config=config)
        add_lora(transformer, lora_rank, lora_rank, 0.0, list(adapter.default_lora_targets))
        if preset.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        latents = torch.randn(1, 16, frames, preset.height // 8, preset.width // 8)
        text = Conditioning(torch.randn(1, CAPTIONS[0], TEXT_DIM), torch.ones(1, CAPTIONS[0], dtype=torch.bool),
                            torch.randn(1, POOLED_DIM))
        kwargs = adapter.transformer_kwargs(transformer, latents, torch.ones(1), text)
        with FlopCounterMode(display=False) as counter:
            adapter.prediction(transformer(**kwargs), latents.shape).float().square().mean().backward()
        counts["a"] = counter.get_total_flops()
        size = encoder_input_size(preset.height, preset.width, preset.image_size, "aspect", 14)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            adapter.decode_latents(hunyuan_vae(), latents)
            dinov2(ENCODER)(pixel_values=torch.randn(frames, 3, *size))
        counts["c"] = counter.get_total_flops()
    grid = adapter.token_grid(transformer, latents.shape)
    student = torch.randn(1, *grid, hidden, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        projected = CrepaProjector(hidden, dim)(student)
        crepa_scores(projected, torch.randn(1, frames, teacher_h, teacher_w, dim)).per_video.sum().backward()
    counts["b"] = counts["a"] + counter.get_total_flops()
    counts["c"] += counts["b"]
    return counts


def clips_left_out(batch_size: int, clips: int = 1000, seed: int = 0) -> float:
    """Share of an epoch's clips that batches of one caption length leave out (one bucket; caption lengths drawn
    uniformly from 40-199 Qwen tokens, as the trainer's sampler sees groups of one bucket and length)."""
    from train.data import BucketBatchSampler

    lengths = torch.randint(40, 200, (clips,), generator=torch.Generator().manual_seed(seed)).tolist()
    sampler = BucketBatchSampler([f"f121_h512_w768/{n}" for n in lengths], [1] * clips, batch_size, seed)
    return 1 - sum(len(batch) for batch in sampler.epoch_batches(0)) / clips


def measure_steps(preset: Preset, args) -> tuple[dict[str, list[float]], float]:
    """Seconds per step of each variant, alternated, and the padding shift (the models are freed on return)."""
    bench = StepBench(preset, args.lora_rank)
    torch.set_num_threads(1)  # one thread's CPU time is the step's own work, however loaded the machine is
    times = time_alternating({name: lambda name=name: bench.step(name) for name in VARIANTS}, args.rounds, warmup=1,
                             clock=time.process_time)
    return times, bench.padding_shift()


def main() -> None:
    args = _arguments()
    preset = PRESETS["cpu"]
    times, shift = measure_steps(preset, args)
    flops = {"T2V Lite, cpu preset": flop_counts(KANDINSKY5_T2V_LITE, preset, args.lora_rank),
             "T2V Lite, full size": flop_counts(KANDINSKY5_T2V_LITE, PRESETS["full"], args.lora_rank),
             "T2V Pro, full size": flop_counts(KANDINSKY5_T2V_PRO, PRESETS["full"], args.lora_rank)}
    record("Kandinsky 5 train step (cpu)", _report(preset, args, times, shift, flops), enabled=not args.no_record)


def _report(preset: Preset, args, times: dict[str, list[float]], shift: float, flops: dict) -> str:
    setup = (f"Kandinsky 5.0 T2V Lite transformer (1792 wide, ff 7168) with {preset.visual_blocks} of 32 visual blocks "
             f"and both text blocks, LoRA rank {args.lora_rank} on attention, CREPA at block "
             f"{min(8, preset.visual_blocks - 1)} against cached DINOv2-g features; {preset.frames} frames x "
             f"{preset.height}x{preset.width}, captions of {CAPTIONS[0]} (and {CAPTIONS[1]}) Qwen tokens, pooled CLIP; "
             f"{args.rounds} alternated rounds, CPU, fp32, one torch thread; times are that thread's CPU seconds "
             f"(the machine is shared, so wall time would measure the neighbours).")
    rows = [[f"({name}) {label}", spread(times[name]), f"{median(times[name]) / median(times['a']):.3f}"]
            for name, label in VARIANTS.items()]
    table = markdown_table(["variant", "step CPU s, median [min, max]", "time / (a)"], rows)
    ratio = median(times["b"]) / median(times["a"])
    split = median(times["split"]) / median(times["padded"])
    flop_rows = [[name, *(f"{counts[v] / 1e12:,.3f}" for v in "abc"), f"{counts['b'] / counts['a']:.4f}",
                  f"{counts['c'] / counts['b']:.2f}"] for name, counts in flops.items()]
    flop_table = markdown_table(["model, size", "(a) TFLOP", "(b) TFLOP", "(c) TFLOP", "(b)/(a)", "(c)/(b)"],
                                flop_rows)
    full = PRESETS["full"]
    return (f"{setup}\n\n{table}\n\n(b)/(a) time = {ratio:.3f} (goal <= 1.03: {'met' if ratio <= 1.03 else 'missed'})."
            f" Mixed caption lengths (the transformer takes no text mask or sequence lengths; the pipeline computes "
            f"cu_seqlens but passes only their maximum, as the text rope length): two forwards take {split:.2f}x one "
            f"padded forward, the most a masked batched forward could save; zero-padding the 96-token "
            f"caption to 120 moves that clip's prediction by {100 * shift:.1f} % (relative RMS), which is why the "
            f"trainer does not pad. Batches of one caption length only would be exact too, but leave clips out of "
            f"every epoch: of 1,000 clips with captions of 40-199 tokens, "
            + ", ".join(f"{100 * clips_left_out(size):.0f} % at batch {size}" for size in (2, 4, 8))
            + " (none at batch 1)."
            f"\n\nFLOPs per step, counted on the meta device; full size is {full.frames} frames "
            f"x {full.height}x{full.width} with gradient checkpointing, (c) adds the HunyuanVideo VAE decode and "
            f"DINOv2-g at {full.image_size} px:\n\n{flop_table}")


def _arguments():
    parser_ = parser(__doc__.splitlines()[0])
    parser_.add_argument("--rounds", type=int, default=4)
    parser_.add_argument("--lora-rank", type=int, default=32)
    return parser_.parse_args()


if __name__ == "__main__":
    main()
