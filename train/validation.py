"""Validation samples during training, with the transformer alone: Euler on the flow-matching ODE from cached text.

No VAE and no text encoder: the prompts' text comes from the cache (precompute encodes them beside the captions),
the samples stay latents under `<output_dir>/validation/step-N/` (`crepa decode` turns them into videos). The
sigmas are the ones diffusers' FlowMatchEulerDiscreteScheduler makes for the family's shift, guidance is
classifier-free against the cached empty prompt, as the families' pipelines do with `negative_prompt=""`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from crepa.errors import UserError
from crepa.families import Conditioning, FamilyAdapter
from crepa.families.loading import load_config
from crepa.prompts import EMPTY_PROMPT, read_prompts
from train.config import TrainConfig
from train.data import prompt_conditioning
from train.experts import DenoiserSet, Stage
from train.loader import TrainData

if TYPE_CHECKING:
    from train.trainer import StepParts

VALIDATION_DIR = "validation"


def step_folder(output_dir: str, step: int) -> str:
    """Where the validation samples of `step` go."""
    return os.path.join(output_dir, VALIDATION_DIR, f"step-{step}")


def flow_sigmas(num_steps: int, shift: float, scheduler_config: dict) -> torch.Tensor:
    """(num_steps + 1,) float32 noise levels from 1 down to 0, as FlowMatchEulerDiscreteScheduler.set_timesteps
    makes them for a static `shift` (dynamic shifting with mu = log(shift) gives the same).

    Evenly spaced from sigma_max = 1 to sigma_min (the scheduler's shifted, or with dynamic shifting unshifted,
    smallest training sigma 1 / num_train_timesteps), shifted (s*t / (1 + (s-1)*t)), stretched to end at
    `shift_terminal` where the scheduler config sets one, then 0 appended.
    """
    train_steps = scheduler_config.get("num_train_timesteps", 1000)

    def shifted(t):  # float32 tensors or float64 arrays, as the scheduler shifts each
        return shift * t / (1 + (shift - 1) * t)

    # the scheduler's largest and smallest training sigmas, computed as it does in float32
    ends = torch.tensor([train_steps, 1.0]) / train_steps
    sigma_max, sigma_min = (ends if scheduler_config.get("use_dynamic_shifting") else shifted(ends)).tolist()
    sigmas = shifted(np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_steps) / train_steps)
    terminal, rest = scheduler_config.get("shift_terminal"), 1 - sigmas
    if terminal and rest[-1] > 0:  # one step (sigma 1 alone) has nothing to stretch
        sigmas = 1 - rest / (rest[-1] / (1 - terminal))
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def _map(conditioning: Conditioning, fn) -> Conditioning:
    """`conditioning` with `fn` applied to each tensor it holds."""
    return Conditioning(**{name: None if value is None else fn(value) for name, value in vars(conditioning).items()})


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(1, *shape) float32 standard normal noise from `seed`, drawn on the CPU: the same on every device."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_flow(adapter: FamilyAdapter, transformer_at: Callable[[float], nn.Module], noise: torch.Tensor,
                sigmas: torch.Tensor, text: Conditioning, empty: Conditioning | None, guidance: float,
                num_train_timesteps: int = 1000) -> torch.Tensor:
    """Euler steps x <- x + (sigma_next - sigma) * v from `noise` (B, C, F, H, W) at sigmas[0] to sigmas[-1].

    v is the velocity for `text` (B prompts) of the transformer `transformer_at(sigma)` (the expert of that noise
    level, in pipelines of several); with `guidance` != 1 it is v_empty + guidance * (v_text - v_empty), v_empty the
    velocity for `empty` (one prompt). The latents stay float32.
    """
    latents = noise.float()
    batch = latents.shape[0]
    if empty is not None:
        empty = _map(empty, lambda value: value.expand(batch, *value.shape[1:]))

    def velocity(transformer: nn.Module, conditioning: Conditioning, timestep: torch.Tensor) -> torch.Tensor:
        if not adapter.text_padding:  # the longest caption's tokens, none of the cache's padding beyond them
            conditioning = conditioning.select(slice(None), int(conditioning.text_mask.sum(dim=1).max()))
        kwargs = adapter.transformer_kwargs(transformer, latents, timestep, conditioning)
        return adapter.prediction(transformer(**kwargs), latents.shape).float()

    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        # the timestep the scheduler hands the pipeline: float32 sigma x num_train_timesteps
        timestep = (torch.tensor(sigma, dtype=torch.float32) * num_train_timesteps).expand(batch).to(latents.device)
        transformer = transformer_at(sigma)
        v = velocity(transformer, text, timestep)
        if guidance != 1.0:
            v_empty = velocity(transformer, empty, timestep)
            v = v_empty + guidance * (v - v_empty)
        latents = latents + (sigma_next - sigma) * v
    return latents


@dataclass
class Validation:
    """The prompts' cached text, the sample shape and the settings, checked before step 0."""

    config: TrainConfig
    adapter: FamilyAdapter
    prompts: list[str]
    text: Conditioning
    """(P, L, D) the prompts' cached text."""
    empty: Conditioning
    """(1, L, D) the cached empty prompt: the unconditional branch of guidance."""
    latent_shape: tuple[int, ...]
    """(C, f, h, w) of one sample."""
    pixel_size: list[int] | None
    """[frames, height, width] the latents decode to (None where the cache records no VAE compression)."""

    @classmethod
    def build(cls, cfg: TrainConfig, adapter: FamilyAdapter, data: TrainData, stages: list[Stage]) -> Validation:
        """The prompts' cached text and the sample shape, or one error naming what is missing; loads no weights.

        Sampling runs from pure noise to the clean clip, so it needs the run to train every stage of the pipeline.
        """
        if data.condition_channels or data.image_embeds_dim:
            raise UserError("--validation-prompts samples text-to-video; this cache holds image-to-video conditioning",
                            fix="drop --validation-prompts and sample with the image-to-video pipeline after training")
        if sum(high - low for low, high in (stage.sigma_range for stage in stages)) < 1.0:
            raise UserError(f"--validation-prompts samples with every expert of the pipeline, and --expert "
                            f"{cfg.expert} trains only {stages[0].describe()}", fix="train --expert both, or drop "
                            "--validation-prompts and sample with the pipeline after training")
        prompts = read_prompts(cfg.validation_prompts)
        option = f" --validation-prompts {cfg.validation_prompts}"
        texts = data.prompt_texts(prompts, "--validation-prompts", option)
        empty = data.prompt_texts([EMPTY_PROMPT], "guidance against the empty prompt", option)
        latent_shape, pixel_size = _sample_shape(cfg, adapter, data)
        return cls(cfg, adapter, prompts, prompt_conditioning(texts, data.text_length),
                   prompt_conditioning(empty, data.text_length), latent_shape, pixel_size)

    def due(self, step: int, max_steps: int) -> bool:
        """Every `validation_every` steps, and after the last."""
        return step % self.config.validation_every == 0 or step == max_steps

    def run(self, denoisers: DenoiserSet, step: int, parts: StepParts) -> str:
        """Sample every prompt with the (unwrapped, LoRA-wrapped) transformers in eval mode; returns the folder.

        Each prompt's noise comes from seed + its index, so every step samples the same noise.
        """
        cfg, adapter = self.config, self.adapter
        transformers = [denoiser.transformer for denoiser in denoisers]
        device = next(transformers[0].parameters()).device
        folder = step_folder(cfg.output_dir, step)
        os.makedirs(folder, exist_ok=True)
        shape = (1, *self.latent_shape)
        shift = parts.shift(torch.Size(shape))
        sigmas = flow_sigmas(cfg.validation_steps, shift, parts.scheduler_config)
        train_steps = parts.scheduler_config.get("num_train_timesteps", 1000)
        empty = _map(self.empty, lambda value: value.to(device))
        was_training = transformers[0].training
        for transformer in transformers:
            transformer.eval()
        try:
            for index, prompt in enumerate(self.prompts):
                seed = cfg.seed + index
                text = _map(self.text, lambda value, row=index: value[row: row + 1].to(device))
                latents = sample_flow(adapter, lambda sigma: transformers[denoisers.index_of(sigma)],
                                      initial_noise(seed, self.latent_shape).to(device), sigmas, text, empty,
                                      cfg.validation_guidance, train_steps)
                self._save(folder, index, latents[0], {
                    "prompt": prompt, "negative_prompt": EMPTY_PROMPT, "seed": seed, "step": step,
                    "latent_shape": list(self.latent_shape), "pixel_size": self.pixel_size, "family": adapter.name,
                    "model": cfg.model, "transformer": cfg.transformer, "num_steps": cfg.validation_steps,
                    "guidance": cfg.validation_guidance, "shift": shift})
        finally:
            for transformer in transformers:
                transformer.train(was_training)
        return folder

    @staticmethod
    def _save(folder: str, index: int, latents: torch.Tensor, info: dict) -> None:
        """`<index>.safetensors` ("latents": (C, f, h, w) normalised, as the cache holds them) and `<index>.json`."""
        path = os.path.join(folder, f"{index}.safetensors")
        save_file({"latents": latents.detach().float().cpu().contiguous()}, f"{path}.tmp",
                  metadata={"info": json.dumps(info)})
        os.replace(f"{path}.tmp", path)
        with open(os.path.join(folder, f"{index}.json.tmp"), "w") as f:
            json.dump(info, f, indent=2)
        os.replace(os.path.join(folder, f"{index}.json.tmp"), os.path.join(folder, f"{index}.json"))


def _sample_shape(cfg: TrainConfig, adapter: FamilyAdapter,
                  data: TrainData) -> tuple[tuple[int, ...], list[int] | None]:
    """(C, f, h, w) latents and [frames, height, width] pixels of a sample: --validation-size through the VAE
    compression the cache records, else the cache's first bucket."""
    compression = data.vae_compression
    if cfg.validation_size is None:
        _, frames, height, width = data.bucket_latent_shape
        if compression is None:
            return data.bucket_latent_shape, None
        temporal, spatial = compression
        return data.bucket_latent_shape, [1 + (frames - 1) * temporal, height * spatial, width * spatial]
    if compression is None:
        raise UserError("--validation-size needs the VAE compression, which the cache does not record (shards "
                        "exported before it did)", fix="re-export them with `crepa cache export --format wds "
                                                       "--overwrite`, or drop --validation-size")
    temporal, spatial = compression
    frames, height, width = cfg.validation_size
    patch = load_config(adapter.transformer_class(), cfg.model, "transformer", cfg.transformer).get("patch_size", 1)
    multiple = spatial * int(patch[-1] if isinstance(patch, list | tuple) else patch)
    if (frames - 1) % temporal or height % multiple or width % multiple:
        raise UserError(f"--validation-size {frames} {height} {width} does not fit the {adapter.name} model",
                        fix=f"use frames = {temporal}k+1 (e.g. {1 + (frames - 1) // temporal * temporal}) and a "
                            f"height and width that are multiples of {multiple} (VAE compression x patch size)")
    shape = (data.latent_channels, 1 + (frames - 1) // temporal, height // spatial, width // spatial)
    return shape, [frames, height, width]

