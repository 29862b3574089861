"""Rectified-flow training targets, as the diffusers flow-matching schedulers define them."""

from __future__ import annotations

import hashlib
import math

import torch


def sample_sigmas(batch: int, scheme: str, shift: float, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0, sigma_range: tuple[float, float] | None = None) -> torch.Tensor:
    """(B,) noise levels in (0, 1): uniform or logit-normal, then the scheduler's shift.

    shift s maps sigma to s*sigma / (1 + (s-1)*sigma), FlowMatchEulerDiscreteScheduler's static shift.
    With `sigma_range` (low, high) the draws follow the same density restricted to that range (inverse CDF, one
    uniform draw each): what the denoiser of one timestep range (a Wan 2.2 expert) sees of the full density.
    """
    device = generator.device
    if sigma_range is not None:
        low, high = (sigma_cdf(bound, scheme, shift, logit_mean, logit_std) for bound in sigma_range)
        quantiles = low + (high - low) * torch.rand(batch, generator=generator, device=device)
        return sigma_quantile(quantiles, scheme, shift, logit_mean, logit_std).clamp(*sigma_range)
    if scheme == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigma_quantile(quantiles: torch.Tensor, scheme: str, shift: float, logit_mean: float = 0.0,
                   logit_std: float = 1.0) -> torch.Tensor:
    """The shifted noise level below which the share `quantiles` of `sample_sigmas`' draws fall."""
    if scheme == "uniform":
        unshifted = quantiles
    else:
        unshifted = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(quantiles))
    return shift * unshifted / (1.0 + (shift - 1.0) * unshifted)


def sigma_cdf(sigma: float, scheme: str, shift: float, logit_mean: float = 0.0, logit_std: float = 1.0) -> float:
    """The share of `sample_sigmas`' draws below `sigma` (the inverse of `sigma_quantile`)."""
    unshifted = sigma / (shift - (shift - 1.0) * sigma)  # the shift's inverse
    if scheme == "uniform" or unshifted <= 0.0 or unshifted >= 1.0:
        return min(max(unshifted, 0.0), 1.0)
    z = (math.log(unshifted / (1.0 - unshifted)) - logit_mean) / logit_std
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


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


def sample_noise(keys: list[str], shape: tuple[int, ...], seed: int, step: int, scheme: str, shift: float,
                 logit_mean: float, logit_std: float, device: torch.device,
                 sigma_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *shape), sigmas (B,)) for the clips `keys`, each drawn from its own `clip_generator`; sigmas
    within `sigma_range` when given (see `sample_sigmas`)."""
    noises, sigmas = [], []
    for key in keys:
        generator = clip_generator(seed, step, key, device)
        noises.append(torch.randn(shape, generator=generator, device=device))
        sigmas.append(sample_sigmas(1, scheme, shift, generator, logit_mean, logit_std, sigma_range))
    return torch.stack(noises), torch.cat(sigmas)
