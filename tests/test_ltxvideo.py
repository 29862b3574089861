"""LTX-Video's own conventions, against LTXPipeline: the token-count flow shift and terminal stretch, the frame rate
in the rotary positions, the family's default CREPA block, and `crepa demo --family ltxvideo` end to end.

What every family shares (text, latents, token grid, LoRA round trip) is in test_family_conformance.py.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline
from safetensors.torch import load_file

from crepa.errors import UserError
from crepa.families import Conditioning, get_family
from crepa.schedule import CrepaWeightSchedule
from crepa.tiny_models import tiny_clip_size
from crepa_cli.main import main
from train.config import TrainConfig
from train.flow_matching import TimestepSampling, sample_noise
from train.lora import LORA_WEIGHTS, lora_layers
from train.trainer import StepParts, run_train, train_step

ADAPTER = get_family("ltxvideo")


@pytest.fixture(scope="module")
def pipe(tiny_pipelines) -> LTXPipeline:
    return LTXPipeline.from_pretrained(tiny_pipelines("ltxvideo"))


def pipeline_mu(pipe: LTXPipeline, frames: int, height: int, width: int) -> float:
    """The `mu` LTXPipeline hands its scheduler when it generates a clip of this size."""
    seen = {}
    set_timesteps = pipe.scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # the pipeline inspects its signature
    def recording(*args, **kwargs):
        seen.update(kwargs)
        return set_timesteps(*args, **kwargs)

    pipe.scheduler.set_timesteps = recording
    try:
        pipe(prompt="a red circle", num_frames=frames, height=height, width=width, num_inference_steps=2,
             guidance_scale=1.0, output_type="latent")
    finally:
        del pipe.scheduler.set_timesteps
    return seen["mu"]


def latent_shape(pipe: LTXPipeline, frames: int, height: int, width: int) -> torch.Size:
    temporal, spatial = ADAPTER.vae_compression(pipe.vae.config)
    return torch.Size((1, pipe.transformer.config.in_channels, 1 + (frames - 1) // temporal, height // spatial,
                       width // spatial))


@pytest.mark.parametrize("size", [(17, 96, 128), (9, 192, 256)])
def test_drawn_sigmas_follow_the_schedule_the_pipeline_samples_with(pipe, size):
    """The shift from the token count (the pipeline's mu) and the stretch to shift_terminal, on the trainer's draws."""
    shape = latent_shape(pipe, *size)
    mu = pipeline_mu(pipe, *size)
    scheduler_config = dict(pipe.scheduler.config)
    assert ADAPTER.flow_shift(scheduler_config, shape) == pytest.approx(math.exp(mu), rel=1e-12)

    torch.manual_seed(0)
    transformer = pipe.transformer
    config = TrainConfig(crepa_enabled=False, timestep_sampling="uniform")
    parts = StepParts(ADAPTER, transformer, None, CrepaWeightSchedule(config.schedule_config()), config,
                      scheduler_config, vae_compression=ADAPTER.vae_compression(pipe.vae.config))
    seen = {}
    hook = transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    keys = [f"clip{i}" for i in range(16)]
    batch = {"keys": keys, "latents": torch.randn(16, *shape[1:]), "text": torch.randn(16, 5, 12),
             "text_mask": torch.ones(16, 5, dtype=torch.bool)}
    try:
        with torch.no_grad():
            train_step(parts, batch, 3, torch.device("cpu"))
    finally:
        hook.remove()
    # the same per-clip draws unshifted, through diffusers' scheduler with the pipeline's mu; a schedule ending at 0
    # is the continuous one, whose stretch does not depend on a step count
    _, raw = sample_noise(keys, tuple(shape[1:]), config.seed, 3, TimestepSampling("uniform"), torch.device("cpu"))
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.warns(RuntimeWarning, match="divide by zero"):  # its shift of sigma 0: e^mu / (e^mu + inf)
        reference.set_timesteps(sigmas=[*raw.tolist(), 0.0], mu=mu)
    torch.testing.assert_close(seen["timestep"], reference.timesteps[:-1], rtol=1e-6, atol=1e-3)
    assert seen["timestep"].min() > 1000 * scheduler_config["shift_terminal"]


def forward(transformer: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor,
            fps: torch.Tensor | None) -> torch.Tensor:
    batch = len(latents)
    conditioning = Conditioning(text, torch.ones(batch, text.shape[1], dtype=torch.bool), fps=fps,
                                vae_compression=(8, 32))
    kwargs = ADAPTER.transformer_kwargs(transformer, latents, torch.full((batch,), 500.0), conditioning)
    with torch.no_grad():
        return ADAPTER.prediction(transformer(**kwargs), latents.shape)


def clips(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, text) of `batch` clips shaped as the tiny transformer takes them."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 8, 3, 3, 4, generator=generator), torch.randn(batch, 6, 12, generator=generator)


def test_clips_of_different_frame_rates_share_a_batch(pipe):
    latents, text = clips(2)
    together = forward(pipe.transformer, latents, text, torch.tensor([16.0, 30.0]))
    alone = [forward(pipe.transformer, latents[i: i + 1], text[i: i + 1], torch.tensor([fps]))
             for i, fps in enumerate((16.0, 30.0))]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-5)
    # and the frame rate does reach the positions: the same clip at another rate is predicted differently
    other = forward(pipe.transformer, latents[:1], text[:1], torch.tensor([30.0]))
    assert not torch.allclose(alone[0], other, atol=1e-4)


def test_an_unknown_frame_rate_is_the_pipelines_default(pipe):
    latents, text = clips(2)
    rate = inspect.signature(LTXPipeline.__call__).parameters["frame_rate"].default
    default = forward(pipe.transformer, latents, text, torch.tensor([float(rate)] * 2))
    unknown = forward(pipe.transformer, latents, text, torch.tensor([math.nan, math.nan]))
    torch.testing.assert_close(unknown, default, rtol=0, atol=0)
    torch.testing.assert_close(forward(pipe.transformer, latents, text, None), default, rtol=0, atol=0)
    assert not torch.allclose(forward(pipe.transformer, latents, text, torch.tensor([16.0, 16.0])), default,
                              atol=1e-4)


def test_without_the_vaes_compression_the_transformer_inputs_fail_clearly():
    conditioning = Conditioning(torch.zeros(1, 4, 12), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(UserError, match="VAE's compression.*vae/config.json"):
        ADAPTER.transformer_kwargs(ADAPTER.tiny_transformer(), torch.zeros(1, 8, 2, 3, 4), torch.ones(1),
                                   conditioning)


@pytest.fixture(scope="module")
def ltx_cache(tmp_path_factory, tiny_pipelines, tiny_models) -> str:
    """A one-clip cache of the tiny LTX-Video pipeline."""
    from conftest import write_dataset

    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute

    root = tmp_path_factory.mktemp("ltx_cache")
    cache = str(root / "cache")
    run_precompute(PrecomputeConfig(dataset_config=write_dataset(root, clips=1, family="ltxvideo"),
                                    family="ltxvideo", out=cache, model=tiny_pipelines("ltxvideo"), device="cpu",
                                    decode_workers=0,
                                    teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)))
    return cache


def test_the_cache_describes_the_latents_as_ltx_normalises_them(ltx_cache):
    from crepa.cache.store import CacheStore

    (latents,) = CacheStore.open(ltx_cache).feature_sets("latents")
    assert latents.attrs["normalisation"] == "(z - latents_mean) * scaling_factor / latents_std, as LTXPipeline"
    assert (latents.attrs["temporal_compression"], latents.attrs["spatial_compression"]) == (8, 32)


def test_the_crepa_block_defaults_to_the_familys(tmp_path, tiny_pipelines, ltx_cache):
    config = TrainConfig(cache=ltx_cache, model=tiny_pipelines("ltxvideo"), output_dir=str(tmp_path / "run"),
                         max_train_steps=1, dataloader_num_workers=0, report_to="none")
    assert config.crepa_block_index is None
    # LTX-Video's block 8 is past the tiny transformer's 3: the default is the family's, checked before step 0
    with pytest.raises(ValueError, match=r"crepa_block_index=8 is out of range.*0\.\.2"):
        run_train(config)
    assert ADAPTER.default_crepa_block == 8


def test_packed_latents_and_predictions_round_trip_in_raster_order():
    latents = torch.randn(2, 8, 3, 3, 4)
    conditioning = Conditioning(torch.zeros(2, 4, 12), torch.ones(2, 4, dtype=torch.bool), vae_compression=(8, 32))
    packed = ADAPTER.transformer_kwargs(ADAPTER.tiny_transformer(), latents, torch.ones(2),
                                        conditioning)["hidden_states"]
    assert packed.shape == (2, 3 * 3 * 4, 8)
    torch.testing.assert_close(packed[1, 2 * 12 + 1 * 4 + 3], latents[1, :, 2, 1, 3], rtol=0, atol=0)  # (t, h, w)
    torch.testing.assert_close(ADAPTER.prediction((packed,), latents.shape), latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"prediction has shape \(2, 35, 8\), expected \(2, 36, 8\)"):
        ADAPTER.prediction(packed[:, :35], latents.shape)


def test_demo_trains_a_lora_the_pipeline_loads_and_generates_with(tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--family", "ltxvideo", "--workdir", str(workdir)], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert "LoRA (diffusers format)" in result.output

    pipe = LTXPipeline.from_pretrained(str(workdir / "models" / "ltxvideo"))
    pipe.load_lora_weights(str(workdir / "run"))
    saved = load_file(os.path.join(workdir, "run", LORA_WEIGHTS))
    loaded = {f"transformer.{name}.{part}.weight": getattr(layer, part)[adapter].weight
              for name, layer in lora_layers(pipe.transformer).items()
              for adapter in layer.lora_A for part in ("lora_A", "lora_B")}
    assert sorted(loaded) == sorted(saved)  # every tensor of the file is in the pipeline, and nothing else
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)

    frames, width, height = tiny_clip_size(ADAPTER)
    video = pipe(prompt="a red circle moving right", num_frames=frames, height=height, width=width,
                 num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, frames, height, width, 3)
    assert (video >= 0).all() and (video <= 1).all()
