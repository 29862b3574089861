"""Wan 2.2 A14B's two experts: the timestep split read from the pipeline, both trained in one run, resumed, and
loaded by WanPipeline into `transformer` and `transformer_2`."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import metrics, train_config
from wan_variants import save_two_expert_pipeline

from crepa.families import get_family
from crepa.schedule import CrepaWeightSchedule
from train.experts import Denoiser, DenoiserSet, Stage, pipeline_stages
from train.flow_matching import TimestepSampling
from train.lora import add_lora, lora_layers
from train.trainer import StepParts, run_train, train_step

BOUNDARY = 0.75
"""The tiny pipeline's boundary_ratio: with its shift of 3 and the logit-normal density, half the steps each."""
SEED = 1
"""A seed whose four steps train the low-noise, high-noise, low, high expert: both in each half of the run."""
LOW_LORA = "pytorch_lora_weights_transformer_2.safetensors"


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory, tiny_models) -> str:
    return save_two_expert_pipeline(tiny_models["wan"], str(tmp_path_factory.mktemp("wan22") / "pipe"), BOUNDARY)


@pytest.fixture(scope="module")
def both_run(tmp_path_factory, trained_cache, tiny_models, two_experts) -> str:
    """Four CREPA steps training both experts, a checkpoint every two."""
    out = str(tmp_path_factory.mktemp("experts") / "run")
    run_train(train_config(trained_cache, tiny_models, out, model=two_experts, seed=SEED, save_every=2,
                           learning_rate=1e-2, comfyui_export=True))
    return out


def test_stages_are_read_from_the_pipeline_config(two_experts, tiny_models):
    assert [(s.component, s.name, s.sigma_range) for s in pipeline_stages(two_experts)] == [
        ("transformer", "high", (BOUNDARY, 1.0)), ("transformer_2", "low", (0.0, BOUNDARY))]
    assert [s.component for s in pipeline_stages(tiny_models["wan"])] == ["transformer"]


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_sigmas_of_a_range_follow_the_full_density_restricted_to_it(scheme):
    density = TimestepSampling(scheme, 3.0)
    full = density.sample(200_000, torch.Generator().manual_seed(0))
    for low, high in ((BOUNDARY, 1.0), (0.0, BOUNDARY)):
        ours = density.within((low, high)).sample(20_000, torch.Generator().manual_seed(1))
        assert ours.min() >= low and ours.max() <= high
        inside = full[(full >= low) & (full < high)]
        levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        torch.testing.assert_close(ours.quantile(levels), inside.quantile(levels), rtol=0, atol=0.01)
        share = float(density.cdf(torch.tensor(high)) - density.cdf(torch.tensor(low)))
        assert abs(share - len(inside) / len(full)) < 0.005


def test_each_step_routes_its_timesteps_as_the_pipeline_does(trained_cache, tiny_models, two_experts):
    """Every timestep a transformer is trained on is one the pipeline would send to it, and the steps split between
    the experts as the density splits between their ranges."""
    adapter = get_family("wan")
    cfg = train_config(trained_cache, tiny_models, "unused", model=two_experts, crepa_enabled=False)
    models = {}
    for index, stage in enumerate(pipeline_stages(two_experts)):
        torch.manual_seed(index)
        models[stage.component] = adapter.transformer_class()(**adapter.tiny_transformer_config()).eval()
    denoisers = DenoiserSet([Denoiser(s, models[s.component], None) for s in pipeline_stages(two_experts)])
    seen = {name: [] for name in models}
    for name, model in models.items():
        model.register_forward_pre_hook(lambda _m, _a, kwargs, name=name: seen[name].append(kwargs["timestep"]),
                                        with_kwargs=True)
    parts = StepParts(adapter, None, None, CrepaWeightSchedule(cfg.schedule_config()), cfg, {"shift": 3.0})
    batch = {"keys": ["clip0", "clip1"], "latents": torch.randn(2, 4, 3, 4, 6), "text": torch.randn(2, 5, 16),
             "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    with torch.no_grad():
        for step in range(16):
            step_parts, chosen = parts.at_step(denoisers, step, batch["latents"].shape)
            train_step(step_parts, batch, step, torch.device("cpu"))
            assert step_parts.transformer is models[pipeline_stages(two_experts)[chosen["denoiser"]].component]
    boundary = BOUNDARY * 1000  # WanPipeline: t >= boundary_ratio * num_train_timesteps goes to `transformer`
    high, low = torch.cat(seen["transformer"]), torch.cat(seen["transformer_2"])
    assert len(high) and len(low) and len(high) + len(low) == 2 * 16
    assert (high >= boundary).all() and (low < boundary).all()

    steps = 4000
    density = TimestepSampling("logit_normal", 3.0)
    share = 1.0 - float(density.cdf(torch.tensor(BOUNDARY)))  # 0.5: the boundary is the density's median
    high_steps = sum(denoisers.index_at(0, step, density) == 0 for step in range(steps))
    assert abs(high_steps / steps - share) < 3 * math.sqrt(share * (1 - share) / steps)


def test_both_experts_train_in_one_run_and_resume_exactly(both_run, trained_cache, tiny_models, two_experts,
                                                          tmp_path):
    assert [row["denoiser"] for row in metrics(both_run)] == [1, 0, 1, 0]  # transformer_2, transformer, ...
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(both_run, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_train(train_config(trained_cache, tiny_models, resumed, model=two_experts, seed=SEED, save_every=2,
                           learning_rate=1e-2, comfyui_export=True, resume="latest"))
    names = ["trainable.safetensors", "trainable_transformer_2.safetensors", "crepa_projector.safetensors",
             "crepa_projector_transformer_2.safetensors"]
    for name in names:
        expected = load_file(os.path.join(both_run, "checkpoint-4", name))
        got = load_file(os.path.join(resumed, "checkpoint-4", name))
        assert expected.keys() == got.keys() and expected
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    state = torch.load(os.path.join(both_run, "checkpoint-4", "optimizer.pt"), weights_only=True)["optimizer"]
    assert len(state["param_groups"]) == 4  # LoRA and projector of each expert
    assert sorted(os.listdir(both_run)) == sorted([
        "checkpoint-2", "checkpoint-4", "crepa_projector.safetensors", "crepa_projector_transformer_2.safetensors",
        "lora_comfyui.safetensors", "lora_comfyui_transformer_2.safetensors", "metrics.jsonl",
        "pytorch_lora_weights.safetensors", LOW_LORA, "train_config.json", "training_curves.png"])


def test_wan_pipeline_loads_each_experts_lora_and_generates_with_both(both_run, two_experts):
    from diffusers import WanPipeline

    adapter = get_family("wan")
    pipe = WanPipeline.from_pretrained(two_experts)
    pipe.load_lora_weights(both_run)
    pipe.load_lora_weights(both_run, weight_name=LOW_LORA, load_into_transformer_2=True)
    for component, trainable in (("transformer", "trainable.safetensors"),
                                 ("transformer_2", "trainable_transformer_2.safetensors")):
        trained = getattr(WanPipeline.from_pretrained(two_experts), component)
        add_lora(trained, 4, 4.0, 0.0, list(adapter.default_lora_targets))
        trained.load_state_dict(load_file(os.path.join(both_run, "checkpoint-4", trainable)), strict=False)
        ours, loaded = lora_layers(trained), lora_layers(getattr(pipe, component))
        assert sorted(loaded) == sorted(ours), component
        for name, layer in ours.items():  # every LoRA tensor arrived in its own expert
            (adapter_name,) = loaded[name].lora_A.keys()
            delta = layer.get_delta_weight("default")
            assert delta.abs().max() > 0, f"{component} {name} was not trained"
            torch.testing.assert_close(loaded[name].get_delta_weight(adapter_name), delta, rtol=1e-5, atol=1e-7)

    calls = {"transformer": 0, "transformer_2": 0}
    for component in calls:
        getattr(pipe, component).register_forward_pre_hook(
            lambda *_, component=component: calls.__setitem__(component, calls[component] + 1))

    def generate(pipeline):
        with torch.no_grad():
            return pipeline(prompt="a red circle moves", num_frames=9, height=48, width=64, num_inference_steps=4,
                            guidance_scale=1.0, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).frames
    video = generate(pipe)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts denoised
    assert torch.isfinite(video).all()
    assert not torch.allclose(video, generate(WanPipeline.from_pretrained(two_experts)), atol=1e-4)


def test_one_expert_trains_alone_and_saves_under_its_component(trained_cache, tiny_models, two_experts, tmp_path):
    out = str(tmp_path / "low")
    run_train(train_config(trained_cache, tiny_models, out, model=two_experts, expert="low", max_train_steps=1))
    assert os.path.exists(os.path.join(out, LOW_LORA))
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert "denoiser" not in metrics(out)[0]
    assert json.load(open(os.path.join(out, "train_config.json")))["expert"] == "low"


def test_expert_mismatches_fail_before_training(both_run, trained_cache, tiny_models, two_experts, tmp_path):
    with pytest.raises(ValueError, match="--expert high: the pipeline .* has one transformer"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "a"), expert="high"))
    with pytest.raises(ValueError, match="trained transformer, transformer_2 but this run trains transformer: resume"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "b"), model=two_experts, expert="high",
                               resume=os.path.join(both_run, "checkpoint-2")))


def test_a_stage_describes_its_range():
    assert Stage("transformer", "high", (0.875, 1.0)).describe() == "transformer (high noise, sigma >= 0.875)"
    assert Stage("transformer_2", "low", (0.0, 0.875)).describe() == "transformer_2 (low noise, sigma < 0.875)"
