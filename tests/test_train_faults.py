"""Training faults: fp16 overflow, autocast scope, unsafe or broken checkpoints, logs after a resume."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_config
from torch import nn

from train.metrics import read_metrics
from train.trainer import optimizer_step, run_train


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test with its own precision starts and leaves it clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fp16_accelerator_on_cpu():
    """accelerate has no fp16 grad scaler on CPU, so the test gives it torch's CPU GradScaler."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def test_fp16_overflow_skips_the_step_and_training_goes_on(fresh_accelerate_state):
    accelerator = fp16_accelerator_on_cpu()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    x = torch.ones(2, 4)

    before = [p.detach().clone() for p in params]
    accelerator.backward(model(x).sum() * torch.tensor(float("inf")))  # an overflowing step
    norm = optimizer_step(accelerator, optimizer, lr_scheduler, params, 1.0)
    assert not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True)), "the overflowing step is skipped"
    assert accelerator.scaler.get_scale() == 2.0**9, "the scaler lowers its scale"
    assert lr_scheduler.last_epoch == 0

    accelerator.backward(model(x).sum())  # the next step unscales and updates as usual
    norm = optimizer_step(accelerator, optimizer, lr_scheduler, params, 1.0)
    assert torch.isfinite(norm)
    assert not torch.equal(before[0], params[0])
    assert lr_scheduler.last_epoch == 1


def poison_second_batch(build_data):
    """build_data whose second micro-batch has infinite latents: that step's gradients are not finite."""

    def build(*args):
        data = build_data(*args)
        clean = data.iterate

        def iterate(epoch: int, consumed: int):
            for index, (at_epoch, at_consumed, batch) in enumerate(clean(epoch, consumed)):
                poison = {"latents": torch.full_like(batch["latents"], float("inf"))} if index == 1 else {}
                yield at_epoch, at_consumed, batch | poison

        data.iterate = iterate
        return data

    return build


@pytest.mark.parametrize("precision", ["no", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="accelerate has no fp16 grad scaler on CPU"))])
def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, trained_cache, tiny_models, monkeypatch,
                                                           fresh_accelerate_state, precision):
    import train.trainer

    monkeypatch.setattr(train.trainer, "build_data", poison_second_batch(train.trainer.build_data))
    out = str(tmp_path / "run")
    result = run_train(train_config(trained_cache, tiny_models, out, log_every=1, mixed_precision=precision))
    norms = [row["grad_norm"] for row in read_metrics(os.path.join(out, "metrics.jsonl"))]
    assert result.steps == 4 and not math.isfinite(norms[1]) and all(map(math.isfinite, norms[2:]))
    weights = load_file(os.path.join(out, "checkpoint-4", "trainable.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_crepa_scores_and_backward_run_in_fp32_outside_autocast(tmp_path, trained_cache, tiny_models, monkeypatch,
                                                               fresh_accelerate_state):
    import train.trainer
    from crepa.loss import crepa_scores

    seen = []

    def observed(*args, **kwargs):
        scores = crepa_scores(*args, **kwargs)
        seen.append(("scores", torch.is_autocast_enabled("cpu"), scores.per_video.dtype))
        scores.per_video.register_hook(lambda grad: seen.append(("backward", torch.is_autocast_enabled("cpu"),
                                                                 grad.dtype)))
        return scores

    monkeypatch.setattr(train.trainer, "crepa_scores", observed)
    run_train(train_config(trained_cache, tiny_models, str(tmp_path / "run"), max_train_steps=1,
                           mixed_precision="bf16"))
    assert seen == [("scores", False, torch.float32), ("backward", False, torch.float32)]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, trained_cache, tiny_models) -> str:
    """A 4-step run logging every step, with checkpoint-2 and checkpoint-4."""
    out = str(tmp_path_factory.mktemp("checkpointed") / "run")
    run_train(train_config(trained_cache, tiny_models, out, save_every=2, log_every=1))
    return out


def resume_from_copy(tmp_path, run: str, trained_cache, tiny_models, **kw) -> str:
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    run_train(train_config(trained_cache, tiny_models, copy, resume=os.path.join(copy, "checkpoint-2"),
                           save_every=2, log_every=1, **kw))
    return copy


def test_metrics_log_has_each_step_once_after_a_resume(tmp_path, checkpointed_run, trained_cache, tiny_models):
    resumed = resume_from_copy(tmp_path, checkpointed_run, trained_cache, tiny_models)
    assert [row["step"] for row in read_metrics(os.path.join(resumed, "metrics.jsonl"))] == [1, 2, 3, 4]


class WritesMarker:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_holding_code_is_refused(tmp_path, checkpointed_run, trained_cache, tiny_models):
    marker = tmp_path / "marker"
    copy = str(tmp_path / "copy")
    shutil.copytree(checkpointed_run, copy)
    torch.save({"optimizer": WritesMarker(str(marker))}, os.path.join(copy, "checkpoint-2", "optimizer.pt"))
    with pytest.raises(ValueError, match=r"optimizer\.pt holds more than tensors and plain values"):
        run_train(train_config(trained_cache, tiny_models, copy, resume=os.path.join(copy, "checkpoint-2")))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_rank0.pt", "trainable.safetensors", "trainer_state.json"])
def test_truncated_checkpoint_file_names_the_file(tmp_path, checkpointed_run, trained_cache, tiny_models, name):
    copy = str(tmp_path / "copy")
    shutil.copytree(checkpointed_run, copy)
    path = os.path.join(copy, "checkpoint-2", name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=rf"{name} is damaged .*resume from another checkpoint"):
        run_train(train_config(trained_cache, tiny_models, copy, resume=os.path.join(copy, "checkpoint-2")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_restores_the_cuda_rng(tmp_path, checkpointed_run, trained_cache, tiny_models):
    from train.checkpoint import load_rng_state, save_rng_state

    save_rng_state(str(tmp_path), 0)
    expected = torch.rand(4, device="cuda")
    load_rng_state(str(tmp_path), 0)
    torch.testing.assert_close(torch.rand(4, device="cuda"), expected, rtol=0, atol=0)


def test_a_failed_lora_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    """A write cut short (a kill, a full disk) never leaves a truncated LoRA under its final name."""
    import safetensors.torch

    from crepa.families import get_family
    from train.lora import COMFYUI_WEIGHTS, LORA_WEIGHTS, add_lora, save_lora

    adapter = get_family("wan")
    model = adapter.transformer_class()(**adapter.tiny_transformer_config())
    add_lora(model, 4, 4.0, 0.0, list(adapter.default_lora_targets))
    out = tmp_path / "run"
    save_lora(adapter, model, str(out), 4, 4.0, comfyui=True)
    before = {name: (out / name).read_bytes() for name in (LORA_WEIGHTS, COMFYUI_WEIGHTS)}

    def cut_short(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", cut_short)
    with pytest.raises(OSError, match="No space left"):
        save_lora(adapter, model, str(out), 4, 4.0, comfyui=True)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before), "no temporary file is left behind"
