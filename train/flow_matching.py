"""Rectified-flow training targets, as the diffusers flow-matching schedulers define them."""

from __future__ import annotations

import hashlib

import torch


def sample_sigmas(batch: int, scheme: str, shift: float, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0, terminal: float = 0.0) -> torch.Tensor:
    """(B,) noise levels in (terminal, 1): uniform or logit-normal, then the scheduler's shift and terminal stretch.

    shift s maps sigma to s*sigma / (1 + (s-1)*sigma), FlowMatchEulerDiscreteScheduler's static shift (its dynamic
    shift is the static one with s = e^mu); a `shift_terminal` then maps sigma to terminal + (1 - terminal) * sigma,
    the scheduler's stretch of a schedule whose last sigma is 0 (the sampler never evaluates the model below it).
    """
    device = generator.device
    if scheme == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device))
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return terminal + (1.0 - terminal) * sigmas


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
                 terminal: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *shape), sigmas (B,)) for the clips `keys`, each drawn from its own `clip_generator`."""
    noises, sigmas = [], []
    for key in keys:
        generator = clip_generator(seed, step, key, device)
        noises.append(torch.randn(shape, generator=generator, device=device))
        sigmas.append(sample_sigmas(1, scheme, shift, generator, logit_mean, logit_std, terminal))
    return torch.stack(noises), torch.cat(sigmas)
