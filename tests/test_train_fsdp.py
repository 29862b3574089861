"""Full fine-tunes sharded with FSDP2 on 2 CPU processes (gloo), against one unsharded process."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from test_train import run_two_processes, train_config

from crepa.errors import UserError
from train.trainer import run_train

HERE = os.path.dirname(os.path.abspath(__file__))
# 6 clips an epoch: 2 ranks x batch 1 and 1 process x accumulation 2 both take clips (2s, 2s+1) at step s
FULL = dict(full=True, max_train_steps=3, num_repeats=2, save_every=2)
COMPARED = [os.path.join("checkpoint-3", "trainable.safetensors"), "crepa_projector.safetensors"]


def assert_same_weights(expected_dir: str, got_dir: str, atol: float) -> None:
    for name in COMPARED:
        expected, got = load_file(os.path.join(expected_dir, name)), load_file(os.path.join(got_dir, name))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol)


def launch(config, out: str) -> str:
    """Train `config` on 2 processes; returns their stdout."""
    path = os.path.join(os.path.dirname(out), os.path.basename(out) + ".json")
    config.save(path)
    return run_two_processes("-m", "train", "--config", path).stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory, trained_cache, tiny_models) -> str:
    """The unsharded reference: one process, accumulation 2, so the same 2 clips per step as 2 ranks."""
    out = str(tmp_path_factory.mktemp("single") / "run")
    run_train(train_config(trained_cache, tiny_models, out, gradient_accumulation_steps=2, **FULL))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, trained_cache, tiny_models) -> tuple[str, str]:
    """(output folder, stdout) of the same run on 2 processes, sharded by default."""
    out = str(tmp_path_factory.mktemp("fsdp") / "run")
    return out, launch(train_config(trained_cache, tiny_models, out, **FULL), out)


def test_capture_sees_the_whole_block_output_of_a_sharded_block():
    done = run_two_processes(os.path.join(HERE, "fsdp_capture_check.py"))
    assert "no: capture ok, student (2, 3, 2, 3, 16) torch.float32, gathered torch.float32" in done.stdout
    assert "bf16: capture ok, student (2, 3, 2, 3, 16) torch.bfloat16, gathered torch.bfloat16" in done.stdout


def test_two_sharded_processes_train_the_weights_one_process_trains(single, sharded):
    out, stdout = sharded
    assert "FSDP2: 3 blocks and the root sharded over 2 processes; weights gathered in fp32" in stdout
    # float32 sums in another order (reduce-scatter's mean vs accumulation): as close as DDP gets (1e-6)
    assert_same_weights(single, out, atol=2e-5)
    # the final transformer is whole, in the diffusers format the pipeline loads
    expected = WanTransformer3DModel.from_pretrained(os.path.join(single, "transformer")).state_dict()
    got = WanTransformer3DModel.from_pretrained(os.path.join(out, "transformer")).state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-5)
    trained = load_file(os.path.join(out, "checkpoint-3", "trainable.safetensors"))
    assert trained.keys() == {name for name, _ in WanTransformer3DModel.from_pretrained(
        os.path.join(out, "transformer")).named_parameters()}, "the checkpoint holds every weight, whole"


def test_a_resumed_sharded_run_equals_the_uninterrupted_one(tmp_path, sharded, trained_cache, tiny_models):
    out, _ = sharded
    resumed = str(tmp_path / "resumed")
    shutil.copytree(out, resumed)
    for later in ("checkpoint-3", "transformer"):  # what the resumed run must write again
        shutil.rmtree(os.path.join(resumed, later))
    os.remove(os.path.join(resumed, "crepa_projector.safetensors"))
    launch(train_config(trained_cache, tiny_models, resumed, resume="latest", **FULL), resumed)
    assert_same_weights(out, resumed, atol=1e-6)


def test_accelerates_own_fsdp_settings_are_refused_with_the_fix(tmp_path, trained_cache, tiny_models, monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(UserError, match="accelerate's FSDP launcher settings .* are not used by crepa train"):
            run_train(train_config(trained_cache, tiny_models, str(tmp_path / "run"), **FULL))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not os.path.exists(tmp_path / "run")
