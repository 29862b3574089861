"""Training targets against diffusers' FlowMatchEulerDiscreteScheduler (the conventions a sampler integrates), and
the timestep densities against their formulas."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from train.flow_matching import TimestepSampling, noisy_input, sample_noise, timesteps_from_sigmas


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
    ours = TimestepSampling(scheme, shift).sample(64, torch.Generator().manual_seed(1)).sort(descending=True).values
    reference = scheduler(shift, raw)
    torch.testing.assert_close(ours, reference.sigmas[:-1], rtol=1e-6, atol=1e-6)  # the last is the terminal 0
    torch.testing.assert_close(timesteps_from_sigmas(ours), reference.timesteps, rtol=1e-6, atol=1e-4)


def test_noisy_input_is_the_schedulers_scale_noise():
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 4, 3, 6, 8), torch.randn(4, 4, 3, 6, 8)
    sigmas = TimestepSampling("uniform", 3.0).sample(4, torch.Generator().manual_seed(2))
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
        a = TimestepSampling(scheme, 3.0).sample(256, torch.Generator().manual_seed(5))
        b = TimestepSampling(scheme, 3.0).sample(256, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        assert a.min() >= 0.0 and a.max() < 1.0


SCHEMES = ("uniform", "logit_normal", "sigmoid", "shift")
SAMPLING = dict(flow_shift=3.0, logit_mean=0.5, logit_std=0.8, sigmoid_scale=1.5)


def formula_quantile(scheme: str, p: float) -> float:
    """The p-quantile of sigma, written from the option's documented formula in plain Python."""
    z = NormalDist().inv_cdf(p)
    base = {"uniform": p, "logit_normal": 1 / (1 + math.exp(-(SAMPLING["logit_mean"] + SAMPLING["logit_std"] * z))),
            "sigmoid": 1 / (1 + math.exp(-SAMPLING["sigmoid_scale"] * z)),
            "shift": 1 / (1 + math.exp(-SAMPLING["sigmoid_scale"] * z))}[scheme]
    k = 1.0 if scheme == "sigmoid" else SAMPLING["flow_shift"]  # sigmoid alone ignores the model's flow shift
    return k * base / (1 + (k - 1) * base)


def empirical_cdf(samples: torch.Tensor, at: float) -> float:
    return (samples <= at).double().mean().item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_density_has_the_quantiles_of_its_formula(scheme):
    sigmas = TimestepSampling(scheme, **SAMPLING).sample(40_000, torch.Generator().manual_seed(11))
    for p in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98):
        # the share of draws below the formula's p-quantile is p, within 4 standard errors (0.01 at n=40,000)
        assert abs(empirical_cdf(sigmas, formula_quantile(scheme, p)) - p) < 0.01, p


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    points = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_timestep_range_is_the_density_cut_to_it(scheme):
    """Draws in [low, high] follow the whole density's draws that fall in the range (rejection sampling)."""
    whole = timesteps_from_sigmas(TimestepSampling(scheme, **SAMPLING).sample(400_000,
                                                                             torch.Generator().manual_seed(4)))
    for low, high in [(200.0, 600.0), (0.0, 500.0), (850.0, 1000.0)]:
        sigmas = TimestepSampling(scheme, **SAMPLING, min_timestep=low, max_timestep=high).sample(
            20_000, torch.Generator().manual_seed(3))
        timesteps = timesteps_from_sigmas(sigmas)
        assert timesteps.min() >= low - 1e-3 and timesteps.max() <= high + 1e-3
        kept = whole[(whole >= low) & (whole <= high)]
        assert len(kept) > 2_000
        # the two-sample KS test's critical value at alpha = 0.001 (at most 0.045 for these sizes); the whole
        # density squeezed into the range instead lands 0.03 to 0.77 away
        critical = 1.95 * math.sqrt((len(timesteps) + len(kept)) / (len(timesteps) * len(kept)))
        assert ks_distance(timesteps, kept) < critical, (low, high)


def test_the_full_range_keeps_the_unrestricted_draws():
    for scheme in SCHEMES:
        plain = TimestepSampling(scheme, **SAMPLING).sample(64, torch.Generator().manual_seed(8))
        ranged = TimestepSampling(scheme, **SAMPLING, min_timestep=0.0, max_timestep=1000.0 - 1e-9).sample(
            64, torch.Generator().manual_seed(8))
        torch.testing.assert_close(ranged, plain, rtol=0, atol=1e-5)


def test_noise_and_timesteps_follow_seed_step_and_clip_key_alone():
    sampling = TimestepSampling("shift", **SAMPLING, min_timestep=100.0, max_timestep=900.0)
    cpu = torch.device("cpu")
    noise, sigmas = sample_noise(["a", "b", "c"], (2, 3), 7, 5, sampling, cpu)
    again_noise, again_sigmas = sample_noise(["c", "a"], (2, 3), 7, 5, sampling, cpu)  # other batch, other order
    torch.testing.assert_close(again_noise, noise[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(again_sigmas, sigmas[[2, 0]], rtol=0, atol=0)
    for other in (sample_noise(["a"], (2, 3), 7, 6, sampling, cpu), sample_noise(["a"], (2, 3), 8, 5, sampling, cpu)):
        assert not torch.equal(other[0][0], noise[0]) and not torch.equal(other[1][0], sigmas[0])


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_a_terminal_stretch_is_the_schedulers_on_a_schedule_that_ends_at_zero(scheme):
    """The scheduler stretches its schedule affinely so that its last sigma lands on `shift_terminal`; for a schedule
    whose last sigma is 0 (the continuous one) that maps sigma to terminal + (1 - terminal) * sigma."""
    raw = unshifted(64, scheme, seed=1)
    ours = TimestepSampling(scheme, 3.0, terminal=0.1).sample(64, torch.Generator().manual_seed(1))
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    reference.set_timesteps(sigmas=[*raw.tolist(), 0.0])
    torch.testing.assert_close(ours, reference.sigmas[:-2], rtol=1e-6, atol=1e-6)  # then 0.0 stretched, and 0
    assert ours.min() > 0.1 and ours.max() < 1.0
