"""What unpadded text costs a family whose transformer takes no text mask (Kandinsky 5), against the alternatives.

The trainer runs clips whose captions differ in length as separate forwards (`train.trainer.forward_runs`). Beside
it, on the same two-clip batch and the product's own `train_step` (LoRA of the family's real transformer, random
weights, visual blocks cut to a few, CREPA from a cached teacher): one forward with the shorter caption zero-padded
to the longer, which is the most any batched alternative (a mask in every attention) could save. Then how far that
padding moves the shorter clip's prediction, and how many clips batches of one caption length only (the other exact
alternative) would leave out of an epoch, counted on the trainer's own batch sampler.
"""

from __future__ import annotations

import time

import torch

from bench.common import markdown_table, median, parser, record, spread, time_alternating
from bench.real_configs import DINOV2
from bench.train_step import ENCODER, FAMILIES, latent_shape, text_batch, vae_compression
from crepa.families import Conditioning, get_family
from crepa.families.kandinsky5_video import Kandinsky5VideoAdapter, randomise_modulation
from crepa.projector import CrepaProjector
from crepa.schedule import CrepaWeightSchedule
from precompute.config import TeacherSettings
from precompute.teacher import teacher_grid
from train.config import TrainConfig
from train.data import BucketBatchSampler
from train.lora import add_lora
from train.trainer import StepParts, build_optimizer, train_step

FAMILY = "kandinsky5_video"
CAPTIONS = (120, 96)
"""Caption lengths (tokens) of the two clips of the batch."""
VARIANTS = {"split": "2 forwards, one per caption length (the trainer)",
            "padded": "1 forward, the shorter caption zero-padded to the longer (wrong without a mask)"}


class PaddedKandinsky5(Kandinsky5VideoAdapter):
    """The family with its text padded like any other family's: one forward per batch."""

    text_padding = True


class TextBench:
    def __init__(self, lora_rank: int):
        self.adapter = adapter = get_family(FAMILY)
        real, preset = FAMILIES[FAMILY], FAMILIES[FAMILY].presets["cpu"]
        torch.manual_seed(0)
        transformer = real.transformer(preset.dit_layers)
        randomise_modulation(transformer, std=0.02)  # zero modulation would make the text irrelevant
        add_lora(transformer, lora_rank, lora_rank, 0.0, list(adapter.default_lora_targets))
        self.transformer = transformer.train()
        self.compression = vae_compression(adapter, real)
        shape = latent_shape(adapter, real, preset, adapter.latent_channels(transformer))
        text = [text_batch(adapter, transformer) for _ in CAPTIONS]
        for clip, length in zip(text, CAPTIONS, strict=True):  # text_batch's caption, cut to this clip's length
            clip["text"][:, length:], clip["text_mask"][:, length:] = 0, False
        grid = teacher_grid(preset.height, preset.width, TeacherSettings(encoder=ENCODER, image_size=preset.image_size),
                            patch=14)
        hidden = DINOV2[ENCODER]["hidden_size"]
        split = {"keys": ["a", "b"], "latents": torch.randn(2, *shape[1:]),
                 **{name: torch.cat([clip[name] for clip in text]) for name in text[0]},
                 "teacher": torch.randn(2, shape[2], *grid, hidden).half()}
        longest = max(CAPTIONS)  # the padded alternative pads to the batch's longest caption, not the cache's length
        self.batches = {"split": split, "padded": split | {"text": split["text"][:, :longest],
                                                           "text_mask": split["text_mask"][:, :longest]}}
        self.projector = CrepaProjector(adapter.hidden_dim(transformer), hidden)
        block = min(adapter.default_crepa_block, preset.dit_layers - 1)
        config = TrainConfig(crepa_block_index=block)
        schedule = CrepaWeightSchedule(config.schedule_config())
        self.parts = {name: StepParts(family, self.transformer, self.projector, schedule, config, {},
                                      vae_compression=self.compression)
                      for name, family in (("split", adapter), ("padded", PaddedKandinsky5()))}
        self.optimizer = build_optimizer(config, self.transformer, self.projector)
        self.step_index = 0

    def step(self, variant: str) -> None:
        loss, _ = train_step(self.parts[variant], self.batches[variant], self.step_index, torch.device("cpu"))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    @torch.no_grad()
    def padding_shift(self) -> float:
        """RMS change of the shorter clip's prediction when its text is zero-padded to the longer caption, relative
        to the prediction's RMS (random weights: the size, not the sign, carries over)."""
        batch = self.batches["split"]
        noisy = batch["latents"][1:]
        conditioning = Conditioning.from_batch(batch, torch.device("cpu"), self.compression).select(slice(1, 2))
        own, padded = (self.adapter.prediction(self.transformer(**self.adapter.transformer_kwargs(
            self.transformer, noisy, torch.tensor([600.0]), conditioning.select(slice(None), tokens))), noisy.shape)
            for tokens in (min(CAPTIONS), max(CAPTIONS)))
        return float((padded - own).square().mean().sqrt() / own.square().mean().sqrt())


def clips_left_out(batch_size: int, clips: int = 1000, seed: int = 0) -> float:
    """Share of an epoch's clips that batches of one caption length leave out: one bucket, caption lengths drawn
    uniformly from 40-199 tokens, each (bucket, length) a group of the trainer's sampler."""
    lengths = torch.randint(40, 200, (clips,), generator=torch.Generator().manual_seed(seed)).tolist()
    sampler = BucketBatchSampler([f"f121_h512_w768/{n}" for n in lengths], [1] * clips, batch_size, seed)
    return 1 - sum(len(batch) for batch in sampler.epoch_batches(0)) / clips


def measure(args) -> tuple[dict[str, list[float]], float]:
    """CPU seconds of one thread per step of each variant, alternated, and the padding shift."""
    bench = TextBench(args.lora_rank)
    torch.set_num_threads(1)  # one thread's CPU time is the step's own work, however loaded the machine is
    times = time_alternating({name: lambda name=name: bench.step(name) for name in VARIANTS}, args.rounds, warmup=1,
                             clock=time.process_time)
    return times, bench.padding_shift()


def main() -> None:
    args = _arguments()
    times, shift = measure(args)
    preset = FAMILIES[FAMILY].presets["cpu"]
    rows = [[f"({name}) {label}", spread(times[name]), f"{median(times[name]) / median(times['padded']):.3f}"]
            for name, label in VARIANTS.items()]
    table = markdown_table(["variant", "step CPU s, median [min, max]", "time / (padded)"], rows)
    left_out = ", ".join(f"{100 * clips_left_out(size):.0f} % at batch {size}" for size in (2, 4, 8))
    body = (f"{FAMILIES[FAMILY].title} transformer with {preset.dit_layers} of 32 visual blocks (both text blocks), "
            f"LoRA rank {args.lora_rank} on attention, CREPA from a cached DINOv2-g teacher; two clips of "
            f"{preset.frames} frames x {preset.height}x{preset.width} with captions of {CAPTIONS[0]} and {CAPTIONS[1]} "
            f"tokens; {args.rounds} alternated rounds, CPU, fp32, one torch thread, times in that thread's CPU seconds "
            f"(the machine is shared: wall time would measure the neighbours).\n\n{table}\n\n"
            f"The transformer takes no text mask or sequence lengths (the pipeline computes cu_seqlens but passes only "
            f"their maximum, as the text rope length). Zero-padding the {CAPTIONS[1]}-token caption to {CAPTIONS[0]} "
            f"moves that clip's prediction by {100 * shift:.1f} % (relative RMS). Batches of one caption length only "
            f"would be exact too, but leave clips out of every epoch: of 1,000 clips with captions of 40-199 tokens, "
            f"{left_out} (none at batch 1).")
    record("Unpadded text (Kandinsky 5, cpu)", body, enabled=not args.no_record)


def _arguments():
    parser_ = parser(__doc__.splitlines()[0])
    parser_.add_argument("--rounds", type=int, default=6)
    parser_.add_argument("--lora-rank", type=int, default=32)
    return parser_.parse_args()


if __name__ == "__main__":
    main()
