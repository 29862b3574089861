"""Training faults: fp16 overflow, autocast scope, unsafe or broken checkpoints, logs after a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train.trainer import optimizer_step


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
