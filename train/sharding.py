"""FSDP2 for full fine-tunes: weights, gradients and optimizer state sharded over the processes.

Each transformer block (the adapter's `blocks(transformer)` list) is its own FSDP unit, gathered for its forward
and backward and freed after; the root unit holds the rest (embeddings, head). With `--mixed-precision bf16|fp16`
the gathered weights are cast to that dtype (FSDP's `MixedPrecisionPolicy`, half the traffic), gradients are
reduced in fp32 into the fp32 master shards, and the forward runs under the same autocast a DDP run gets, so
timesteps, RoPE tables and norms keep the precision the model gives them. Gradients are reduce-scattered after
every micro-step of an accumulation (whole gradients kept until the last would cost the memory FSDP saves). The
CREPA projector is tiny: it stays whole on every process and accelerate's DDP all-reduces its gradients.

Checkpoints hold whole tensors, gathered one at a time to the main process, in the files and names a run without
FSDP writes; on resume every process reads them and keeps its own slices. Every process calls the functions here
that gather, since each gather is a collective.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from crepa.errors import UserError
from crepa.families import FamilyAdapter
from train.config import TrainConfig
from train.precision import COMPUTE_DTYPE


def use_fsdp(cfg: TrainConfig, accelerator) -> bool:
    """Whether this run shards: a --full fine-tune on more than one process, unless --no-fsdp.

    accelerate's own FSDP (`accelerate launch --use_fsdp`, `distributed_type: FSDP` in an accelerate config) wraps
    modules by class name and prepares one model per run, so the launcher's request is refused with the fix.
    """
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise UserError("accelerate's FSDP launcher settings (--use_fsdp, distributed_type: FSDP) are not used by "
                        "crepa train", fix="launch with a plain multi-process setting (accelerate launch "
                        "--multi_gpu, or torchrun); --full runs on several processes shard with FSDP2 by themselves")
    return cfg.full and cfg.fsdp and accelerator.num_processes > 1


def prepare_models(accelerator, adapter: FamilyAdapter, built: list[tuple[nn.Module, nn.Module | None]],
                   optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[list[tuple[nn.Module, nn.Module | None]],
                                                                          object]:
    """`accelerator.prepare` each (transformer, projector) pair and the optimizer; with `fsdp` the transformers are
    sharded here instead of wrapped in DDP, and the optimizer gets their shards in place of their whole weights."""
    if fsdp:
        for transformer, _ in built:
            whole = dict(transformer.named_parameters())
            shard(adapter, transformer, accelerator.mixed_precision, accelerator.device)
            shards = {id(whole[name]): param for name, param in transformer.named_parameters()}
            for group in optimizer.param_groups:
                group["params"] = [shards.get(id(param), param) for param in group["params"]]
        if accelerator.is_main_process:
            print(f"FSDP2: {len(adapter.blocks(built[0][0]))} blocks and the root sharded over "
                  f"{accelerator.num_processes} processes; weights gathered in "
                  f"{accelerator.mixed_precision if accelerator.mixed_precision != 'no' else 'fp32'}")
    models = [model for transformer, projector in built
              for model in ((projector,) if fsdp else (transformer, projector)) if model is not None]
    prepared = accelerator.prepare(*models, optimizer)
    *prepared, optimizer = prepared if isinstance(prepared, tuple) else (prepared,)
    wrapped = iter(prepared)
    pairs = [(transformer if fsdp else next(wrapped), None if projector is None else next(wrapped))
             for transformer, projector in built]
    return pairs, optimizer


def shard(adapter: FamilyAdapter, transformer: nn.Module, mixed_precision: str, device: torch.device) -> None:
    """Shard `transformer` in place over all processes: each block its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    dtype = None if mixed_precision == "no" else COMPUTE_DTYPE[mixed_precision]
    # inputs keep their dtype: the autocast below decides each op's, as it does for a DDP run
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None,
                                  cast_forward_inputs=False)
    # FSDP warns that a view returned by the root loses its backward hook if modified in place; the trainer only
    # reads the prediction (adapters reshape it, the loss takes .float())
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in adapter.blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    if dtype is not None:
        _autocast_forward(transformer, device.type, dtype)


def _autocast_forward(model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run `model`'s forward under autocast, as `accelerator.prepare` does for the models it wraps."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = autocast_forward


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """`value` whole: a sharded tensor is gathered from every process (all must call this), others pass through."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def trainable_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The trainable weights, whole and on the CPU where `keep` (the main process); {} elsewhere."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = full_tensor(param.detach())
            if keep:
                state[name] = value.to("cpu").contiguous()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the model's parameters, each process keeping its own shard."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(_like(params[name], value))


def optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict:
    """`optimizer.state_dict()` with every sharded tensor whole: what the optimizer of an unsharded run holds."""
    saved = optimizer.state_dict()
    state = {}
    for index, values in saved["state"].items():  # the same order on every process: one gather after another
        values = {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in values.items()}
        state[index] = {key: value.to("cpu") if torch.is_tensor(value) else value for key, value in values.items()}
    return {**saved, "state": state} if keep else {}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a state `optimizer_state` (or an unsharded run) saved, each process keeping its own shards."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state = {index: {key: _like(params[int(index)], value) if torch.is_tensor(value) else value
                     for key, value in values.items()}
             for index, values in saved["state"].items()}
    optimizer.load_state_dict({**saved, "state": state})


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` sharded as `param` is, when `value` is a whole tensor of a sharded parameter's shape."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        # every process read the same file: each takes its own slice, no communication
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def save_full_model(adapter: FamilyAdapter, transformer: nn.Module, folder: str, main: bool) -> None:
    """`save_pretrained` of the whole transformer into `folder` (main process), loadable by the family's pipeline.

    Every process calls it; a sharded model is gathered into an unsharded copy of the family's class first.
    """
    model = adapter.unwrap(transformer)
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        if main:
            model.save_pretrained(folder)
        return
    state = {}
    for name, value in model.state_dict().items():  # one whole tensor at a time on the other processes
        value = full_tensor(value.detach())
        if main:
            state[name] = value.to("cpu")
    if main:
        with torch.device("meta"):
            whole = adapter.transformer_class().from_config(model.config)
        whole.load_state_dict(state, assign=True)
        whole.save_pretrained(folder)
