"""Rectified-flow training targets, as the diffusers flow-matching schedulers define them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.config import TrainConfig

SHIFTED_SAMPLING = ("uniform", "logit_normal", "shift")
"""Timestep densities that apply the model's flow shift; `sigmoid` is used as drawn."""
FULL_RANGE = (0.0, 1000.0)
"""The timestep scale; a narrower [min_timestep, max_timestep] cuts the density to it."""


@dataclass(frozen=True)
class TimestepSampling:
    """The density of a clip's noise level sigma = timestep / 1000, as a monotone map of one draw.

    - uniform:      sigma = shift(u), u ~ U(0, 1)
    - logit_normal: sigma = shift(sigmoid(logit_mean + logit_std * z)), z ~ N(0, 1)
    - sigmoid:      sigma = sigmoid(sigmoid_scale * z), no shift (musubi-tuner's `sigmoid`)
    - shift:        sigma = shift(sigmoid(sigmoid_scale * z)) (musubi-tuner's `shift`)

    shift(s) = k*s / (1 + (k-1)*s) with k the flow shift, FlowMatchEulerDiscreteScheduler's static shift (its
    dynamic shift is the static one with k = e^mu); with the scheduler's `shift_terminal` the shifted sigma is then
    stretched to terminal + (1 - terminal) * sigma, the scheduler's stretch of a schedule whose last sigma is 0.
    A timestep range narrower than [0, 1000] maps the draw to its quantile p (u itself, or Phi(z)), rescales p into
    [F(min), F(max)], F being the density's CDF at sigma = timestep / 1000, and maps it back: sigma then follows the
    density truncated to the range (what rejecting draws outside it would give, without a loop), rather than the
    whole density squeezed into it (musubi-tuner's default).
    """

    scheme: str = "logit_normal"
    flow_shift: float = 1.0
    """The model's flow shift; only the schemes in SHIFTED_SAMPLING apply it."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    terminal: float = 0.0
    """The scheduler's shift_terminal (0: none); applied with the shift."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, flow_shift: float, terminal: float = 0.0) -> TimestepSampling:
        return cls(cfg.timestep_sampling, flow_shift, cfg.logit_mean, cfg.logit_std, cfg.sigmoid_scale,
                   cfg.min_timestep, cfg.max_timestep, terminal)

    @property
    def shift(self) -> float:
        """The shift applied to the draws: the model's, or 1 (none) for `sigmoid`."""
        return self.flow_shift if self.scheme in SHIFTED_SAMPLING else 1.0

    @property
    def stretch(self) -> float:
        """The terminal the draws are stretched to: the scheduler's, or 0 (none) for `sigmoid`."""
        return self.terminal if self.scheme in SHIFTED_SAMPLING else 0.0

    def within(self, sigma_range: tuple[float, float]) -> TimestepSampling:
        """The same density cut to the noise levels `sigma_range` (low, high) as well: what the denoiser of one
        timestep range (a Wan 2.2 expert) sees of it."""
        low, high = sigma_range
        return replace(self, min_timestep=max(self.min_timestep, 1000.0 * low),
                       max_timestep=min(self.max_timestep, 1000.0 * high))

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) float32 sigmas in [min_timestep, max_timestep] / 1000, drawn from `generator`."""
        device = generator.device
        if self.scheme == "uniform":
            draw = torch.rand(batch, generator=generator, device=device)
        else:
            draw = torch.randn(batch, generator=generator, device=device)
        if (self.min_timestep, self.max_timestep) != FULL_RANGE:  # the full range keeps the draws bit for bit
            draw = self._restrict(draw)
        return self._sigma(draw).float()

    def _normal(self) -> tuple[float, float]:
        """(mean, std) of the logit before the shift, for the schemes that draw a normal."""
        return (self.logit_mean, self.logit_std) if self.scheme == "logit_normal" else (0.0, self.sigmoid_scale)

    def _sigma(self, draw: torch.Tensor) -> torch.Tensor:
        if self.scheme == "uniform":
            sigma = draw
        else:
            mean, std = self._normal()
            sigma = torch.sigmoid(mean + std * draw)
        k, terminal = self.shift, self.stretch
        return terminal + (1.0 - terminal) * (k * sigma / (1.0 + (k - 1.0) * sigma))

    def cdf(self, sigma: torch.Tensor) -> torch.Tensor:
        """The density's CDF at `sigma` (before any timestep range): the quantile of the draw `_sigma` maps to it."""
        k, terminal = self.shift, self.stretch
        sigma = ((sigma - terminal) / (1.0 - terminal)).clamp(0.0, 1.0)  # the stretch's inverse
        sigma = sigma / (k - (k - 1.0) * sigma)  # the shift's inverse
        if self.scheme == "uniform":
            return sigma
        mean, std = self._normal()
        return torch.special.ndtr((torch.special.logit(sigma) - mean) / std)

    def _restrict(self, draw: torch.Tensor) -> torch.Tensor:
        """The draw moved, quantile for quantile, into the range's share of its distribution (float64: the normal
        CDF and its inverse lose the tails in float32)."""
        bounds = torch.tensor([self.min_timestep, self.max_timestep], dtype=torch.float64, device=draw.device)
        low, high = self.cdf(bounds / 1000.0)
        uniform = self.scheme == "uniform"
        quantile = low + (high - low) * (draw.double() if uniform else torch.special.ndtr(draw.double()))
        return quantile if uniform else torch.special.ndtri(quantile)


def describe_timesteps(cfg: TrainConfig) -> str:
    """The start-up line's account of the timestep density: "timesteps sigmoid(1.5 z) in [0, 500], not flow-shifted"."""
    density = {"uniform": "uniform", "logit_normal": f"logit-normal({cfg.logit_mean:g}, {cfg.logit_std:g})",
               "sigmoid": f"sigmoid({cfg.sigmoid_scale:g} z)", "shift": f"sigmoid({cfg.sigmoid_scale:g} z)"}
    shifted = "flow-shifted" if cfg.timestep_sampling in SHIFTED_SAMPLING else "not flow-shifted"
    bounds = (cfg.min_timestep, cfg.max_timestep)
    cut = "" if bounds == FULL_RANGE else f" in [{bounds[0]:g}, {bounds[1]:g}]"
    return f"timesteps {density[cfg.timestep_sampling]}{cut}, {shifted}"



def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - sigma) x_0 + sigma * noise, and the velocity target noise - x_0."""
    sigma = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigma) * latents + sigma * noise, noise - latents


def timesteps_from_sigmas(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timestep the denoiser is conditioned on: sigma on the scheduler's 0..1000 scale."""
    return sigmas * num_train_timesteps


def clip_generator(seed: int, step: int, key: str, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, step, clip key).

    A clip's noise and noise level at a step then do not depend on the rank, the batch or the accumulation
    micro-step it lands in, and a resumed run draws exactly what the uninterrupted one drew.
    """
    digest = hashlib.sha256(f"{seed}/{step}/{key}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_noise(keys: list[str], shape: tuple[int, ...], seed: int, step: int, sampling: TimestepSampling,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *shape), sigmas (B,)) for the clips `keys`, each drawn from its own `clip_generator`."""
    noises, sigmas = [], []
    for key in keys:
        generator = clip_generator(seed, step, key, device)
        noises.append(torch.randn(shape, generator=generator, device=device))
        sigmas.append(sampling.sample(1, generator))
    return torch.stack(noises), torch.cat(sigmas)
