"""The CREPA block capture on a transformer sharded with FSDP2, run on 2 processes by test_train_fsdp.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_capture_check.py

Each block of the tiny Wan is its own FSDP unit (`train.sharding.shard`). The capture's forward hook must still see
the whole block output, since FSDP gathers a block's weights before its forward and the hook runs inside it, and
the gradient through the captured output must reach every shard. Both are compared with the same model unsharded
on each process: in fp32 to float tolerance; in bf16 the weights are gathered in bf16 and reduced into fp32
shards. Prints one line per check on rank 0; a failed check raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from crepa.capture import BlockCapture
from crepa.families import get_family
from train.sharding import full_tensor, shard

BLOCK = 1


def forward_backward(adapter, model, autocast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student (B, F, hs, ws, D), loss) of one forward on fixed inputs, the same on every process."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 4, 6, generator=generator)  # (B, C, F, H, W)
    inputs = dict(hidden_states=latents, timestep=torch.tensor([700.0, 30.0]),
                  encoder_hidden_states=torch.randn(2, 5, 16, generator=generator), return_dict=False)
    with BlockCapture(adapter, model, BLOCK) as capture, torch.autocast("cpu", autocast or torch.float32,
                                                                        enabled=autocast is not None):
        prediction = model(**inputs)[0]
        student = capture.student(latents.shape)
    loss = student.float().square().mean() + prediction.float().square().mean()
    loss.backward()
    return student.detach(), loss.detach()


def check(mixed_precision: str) -> None:
    adapter = get_family("wan")
    torch.manual_seed(0)
    reference = adapter.transformer_class()(**adapter.tiny_transformer_config())
    sharded = adapter.transformer_class()(**adapter.tiny_transformer_config())
    sharded.load_state_dict(reference.state_dict())
    shard(adapter, sharded, mixed_precision, torch.device("cpu"))
    block = adapter.blocks(sharded)[BLOCK]
    gathered = []
    block.register_forward_pre_hook(lambda module, _args: gathered.append(module.attn1.to_q.weight.dtype))

    dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    expected, _ = forward_backward(adapter, reference, dtype)
    student, _ = forward_backward(adapter, sharded, None)  # `shard` puts the forward under autocast itself
    local = block.attn1.to_q.weight
    assert local.to_local().shape[0] < local.shape[0], "the block's weights are sharded between the forwards"
    assert student.shape == expected.shape == (2, 3, 2, 3, 16), student.shape  # every token, the full width
    assert gathered == [dtype or torch.float32], gathered

    tolerance = 0.05 if dtype else 1e-6  # bf16: weights rounded to bf16 before use, not only inside matmuls
    torch.testing.assert_close(student.float(), expected.float(), rtol=0, atol=tolerance)
    names = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        # each process fed the same inputs, so the mean of their gradients is the unsharded gradient
        torch.testing.assert_close(full_tensor(param.grad), names[name].grad, rtol=0.05 if dtype else 1e-5,
                                   atol=tolerance)
    if dist.get_rank() == 0:
        print(f"{mixed_precision}: capture ok, student {tuple(student.shape)} {student.dtype}, "
              f"gathered {gathered[0]}, max difference {(student.float() - expected.float()).abs().max():.2e}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        check("no")
        check("bf16")
        dist.barrier()  # every collective of both checks has finished on both processes before gloo shuts down
    finally:
        dist.destroy_process_group()
