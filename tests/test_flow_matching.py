"""Training targets against diffusers' FlowMatchEulerDiscreteScheduler: the conventions a sampler integrates."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from train.flow_matching import noisy_input, sample_sigmas, timesteps_from_sigmas


def scheduler(shift: float, sigmas: torch.Tensor) -> FlowMatchEulerDiscreteScheduler:
    """A scheduler stepping through `sigmas` (before its shift), as a pipeline sets it up."""
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(sigmas=sigmas.tolist())
    return s


def unshifted(batch: int, scheme: str, seed: int) -> torch.Tensor:
    """The draw before the shift: uniform, or the sigmoid of a standard normal (logit-normal, mean 0, std 1)."""
    generator = torch.Generator().manual_seed(seed)
    if scheme == "uniform":
        return torch.rand(batch, generator=generator)
    return torch.sigmoid(torch.randn(batch, generator=generator))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shifted_sigmas_and_timesteps_are_the_schedulers(scheme, shift):
    raw = unshifted(64, scheme, seed=1).sort(descending=True).values
    ours = sample_sigmas(64, scheme, shift, torch.Generator().manual_seed(1)).sort(descending=True).values
    reference = scheduler(shift, raw)
    torch.testing.assert_close(ours, reference.sigmas[:-1], rtol=1e-6, atol=1e-6)  # the last is the terminal 0
    torch.testing.assert_close(timesteps_from_sigmas(ours), reference.timesteps, rtol=1e-6, atol=1e-4)


def test_noisy_input_is_the_schedulers_scale_noise():
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 4, 3, 6, 8), torch.randn(4, 4, 3, 6, 8)
    sigmas = sample_sigmas(4, "uniform", 3.0, torch.Generator().manual_seed(2))
    reference = scheduler(1.0, sigmas)  # already shifted: take them as they are
    noisy, _ = noisy_input(latents, noise, sigmas)
    expected = reference.scale_noise(latents, timesteps_from_sigmas(sigmas), noise)
    torch.testing.assert_close(noisy, expected)


def test_velocity_target_is_what_the_euler_step_integrates():
    """With the exact velocity as model output, each Euler step lands on the next noisy input, the last on x_0."""
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 6, 8), torch.randn(2, 4, 3, 6, 8)
    reference = scheduler(3.0, torch.linspace(1.0, 0.05, 8))
    sample = noisy_input(latents, noise, reference.sigmas[:1].expand(2))[0]
    for i, timestep in enumerate(reference.timesteps):
        _, target = noisy_input(latents, noise, reference.sigmas[i].expand(2))
        sample = reference.step(target, timestep, sample, return_dict=False)[0]
        expected = noisy_input(latents, noise, reference.sigmas[i + 1].expand(2))[0]
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample, latents, rtol=1e-5, atol=1e-5)


def test_sigmas_stay_in_the_unit_interval_and_follow_the_generator():
    for scheme in ("uniform", "logit_normal"):
        a = sample_sigmas(256, scheme, 3.0, torch.Generator().manual_seed(5))
        b = sample_sigmas(256, scheme, 3.0, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        assert a.min() >= 0.0 and a.max() < 1.0


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_a_terminal_stretch_is_the_schedulers_on_a_schedule_that_ends_at_zero(scheme):
    """The scheduler stretches its schedule affinely so that its last sigma lands on `shift_terminal`; for a schedule
    whose last sigma is 0 (the continuous one) that maps sigma to terminal + (1 - terminal) * sigma."""
    raw = unshifted(64, scheme, seed=1)
    ours = sample_sigmas(64, scheme, 3.0, torch.Generator().manual_seed(1), terminal=0.1)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    reference.set_timesteps(sigmas=[*raw.tolist(), 0.0])
    torch.testing.assert_close(ours, reference.sigmas[:-2], rtol=1e-6, atol=1e-6)  # then 0.0 stretched, and 0
    assert ours.min() > 0.1 and ours.max() < 1.0
