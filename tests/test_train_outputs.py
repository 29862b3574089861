"""What a `crepa train` run leaves behind for the tools users open it with: checkpoints that the pipeline's
`load_lora_weights` takes as they are, tensorboard event files, and the timestep options as given."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from crepa.families import get_family
from crepa_cli.main import main
from train.lora import COMFYUI_WEIGHTS, LORA_WEIGHTS, add_lora, lora_layers

STEPS = 3


def train_arguments(cache: str, model: str, out: str, *extra: str) -> list[str]:
    return ["train", "--cache", cache, "--model", model, "--output-dir", out, "--crepa-block-index", "1",
            "--max-train-steps", str(STEPS), "--dataloader-num-workers", "0", "--lora-rank", "4",
            "--learning-rate", "1e-2", *extra]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, trained_cache, tiny_models) -> str:
    """Output folder of a 3-step run saving every step, keeping 2, with the ComfyUI export and tensorboard."""
    out = str(tmp_path_factory.mktemp("loop") / "run")
    result = CliRunner().invoke(main, train_arguments(
        trained_cache, tiny_models["wan"], out, "--save-every", "1", "--keep-last", "2", "--comfyui-export",
        "--report-to", "tensorboard", "--timestep-sampling", "shift", "--sigmoid-scale", "1.5",
        "--min-timestep", "200", "--max-timestep", "700"), prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert "timesteps sigmoid(1.5 z) in [200, 700], flow-shifted" in result.output  # the start-up line
    return out


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_newest_checkpoints_are_kept_each_with_its_lora(cli_run):
    kept = sorted(name for name in os.listdir(cli_run) if name.startswith("checkpoint-"))
    assert kept == ["checkpoint-2", "checkpoint-3"]
    for name in kept:
        files = set(os.listdir(os.path.join(cli_run, name)))
        assert {LORA_WEIGHTS, COMFYUI_WEIGHTS, "trainable.safetensors", "crepa_projector.safetensors"} <= files


@pytest.mark.parametrize("weights", [LORA_WEIGHTS, COMFYUI_WEIGHTS])
def test_the_pipeline_loads_a_checkpoints_lora_as_the_step_trained_it(cli_run, tiny_models, weights):
    import diffusers

    adapter = get_family("wan")
    folder = os.path.join(cli_run, "checkpoint-2")
    trained = diffusers.WanPipeline.from_pretrained(tiny_models["wan"]).transformer
    add_lora(trained, 4, 4.0, 0.0, list(adapter.default_lora_targets))
    trained.load_state_dict(load_file(os.path.join(folder, "trainable.safetensors")), strict=False)
    ours = lora_layers(trained)

    pipe = diffusers.WanPipeline.from_pretrained(tiny_models["wan"])
    pipe.load_lora_weights(folder, weight_name=weights)
    loaded = lora_layers(pipe.transformer)
    assert sorted(loaded) == sorted(ours)
    final = load_file(os.path.join(cli_run, LORA_WEIGHTS))
    step_2 = load_file(os.path.join(folder, LORA_WEIGHTS))
    assert any(not torch.equal(final[name], step_2[name]) for name in final), "step 3 should change the LoRA"
    for name, layer in ours.items():  # the step-2 weights arrived, not the final ones
        (adapter_name,) = loaded[name].lora_A.keys()
        torch.testing.assert_close(loaded[name].get_delta_weight(adapter_name), layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-7)


def test_tensorboard_holds_every_logged_step(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(cli_run, "logs", "crepa")).Reload()
    rows = metrics(cli_run)
    for name in ("loss", "loss_flow", "crepa_alignment_score", "lr", "grad_norm", "flow_shift"):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2, 3], name
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in rows], rel=1e-6), name


def test_timestep_options_reach_the_run(cli_run):
    saved = json.load(open(os.path.join(cli_run, "train_config.json")))
    assert (saved["timestep_sampling"], saved["sigmoid_scale"], saved["min_timestep"], saved["max_timestep"]) == \
        ("shift", 1.5, 200.0, 700.0)
    assert [row["flow_shift"] for row in metrics(cli_run)] == [3.0] * STEPS  # the tiny pipeline's scheduler


def test_wandb_runs_offline_or_names_the_install(tmp_path, trained_cache, tiny_models, monkeypatch):
    out = str(tmp_path / "run")
    arguments = train_arguments(trained_cache, tiny_models["wan"], out, "--report-to", "wandb")
    if importlib.util.find_spec("wandb") is None:
        result = CliRunner().invoke(main, arguments, prog_name="crepa")
        assert result.exit_code == 1
        assert result.output.startswith("Error: --report-to wandb needs the wandb package, which is not installed: "
                                        "pip install wandb"), result.output
        assert not os.path.exists(out), "nothing is written before the check"
    else:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        result = CliRunner().invoke(main, arguments, prog_name="crepa")
        assert result.exit_code == 0, result.output
        assert any(name.startswith("offline-run-") for name in os.listdir(tmp_path / "wandb"))
        assert len(metrics(out)) == STEPS
