"""How the frozen base weights are stored and computed with: `--base-dtype bf16|fp16|fp32|fp8`.

bf16, fp16 and fp32 load the checkpoint straight in that dtype (diffusers keeps the model's
`_keep_in_fp32_modules`, e.g. Wan's norms, time embedder and `scale_shift_table`, in fp32) and
compute in it. fp8 stores each frozen `nn.Linear` weight as float8_e4m3fn with one fp32 scale per
tensor (absmax / 448 of its bf16 cast, so no weight saturates) and upcasts it to bf16 inside that
layer's forward and backward: the model is held at about a quarter of its fp32 size and only one
layer's bf16 copy exists at a time, while loading too (train/base_loading.py quantises each layer as
it is read). Layers the model asks diffusers' layerwise casting to skip
(`_skip_layerwise_casting_patterns`: Wan's patch and condition embedders and norms) and its fp32
modules are left as loaded. Trainable weights (LoRA, projector) are never touched.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
LOAD_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
"""Dtype passed to `from_pretrained` as `torch_dtype`: never a full fp32 copy when less is asked."""
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
"""Dtype of the activations through the base model."""


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later); nothing without CUDA."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class _ScaledFp8Matmul(torch.autograd.Function):
    """x @ (w8 * scale)^T with the scale applied to the output: only the fp8 weight is saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ weight.to(grad.dtype), None, None


class Fp8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is float8_e4m3fn times one fp32 scale, computed in `compute_dtype`.

    Still an `nn.Linear`: it takes the place of a frozen layer, or of the `base_layer` inside a peft LoRA layer,
    wherever the model or peft looks for one.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        weight = linear.weight.detach()
        absmax = weight.abs().amax().float()
        scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
        scaled = weight.to(torch.float32, copy=True).div_(scale)  # one fp32 copy, never the caller's weight
        self.weight = nn.Parameter(scaled.to(FP8), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        y = _ScaledFp8Matmul.apply(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


def _skipped(model: nn.Module, name: str) -> bool:
    patterns = list(getattr(model, "_skip_layerwise_casting_patterns", None) or [])
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return any(re.search(pattern, name) for pattern in patterns)


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the plain `nn.Linear` layers fp8 stores: all outside the model's skip patterns."""
    return [name for name, module in model.named_modules() if type(module) is nn.Linear and not _skipped(model, name)]


def quantize_fp8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every frozen layer of `fp8_layers` by an `Fp8Linear`, one at a time.

    Call it after freezing (and after adding LoRA, whose trainable layers it leaves alone), so the
    peak is the loaded bf16 model plus one layer. Returns how many layers were quantised.
    """
    names = [name for name in fp8_layers(model)
             if not any(p.requires_grad for p in model.get_submodule(name).parameters())]
    for name in names:  # names, not modules: each bf16 layer is freed as soon as it is replaced
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(getattr(parent, child), compute_dtype))
    # DDP broadcasts every parameter at start and gloo has no fp8; frozen weights read from the same
    # checkpoint on every rank need no broadcast (also those `load_base` quantised while loading)
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | {f"{name}.weight" for name, module in
                                                                model.named_modules() if isinstance(module, Fp8Linear)})
    return len(names)


def cast_inputs(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point inputs reach the model in `dtype`, as diffusers pipelines pass them; timesteps keep theirs."""
    names = list(inspect.signature(model.forward).parameters)

    def cast(name: str, value):
        keep = "timestep" in name or not (torch.is_tensor(value) and value.is_floating_point())
        return value if keep else value.to(dtype)

    def hook(_module, args, kwargs):
        return (tuple(cast(name, value) for name, value in zip(names, args, strict=False)) + args[len(names):],
                {name: cast(name, value) for name, value in kwargs.items()})

    model.register_forward_pre_hook(hook, with_kwargs=True)


def own_fp32_tensors(model: nn.Module) -> None:
    """Copy the fp32 tensors a narrow load kept (`_keep_in_fp32_modules`) out of the mapped checkpoint.

    diffusers leaves them as views of the memory-mapped safetensors file, which keeps the whole file's
    pages in this process's RSS; a copy of these few small tensors lets the mapping go.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype == torch.float32 and not tensor.requires_grad:
            tensor.data = tensor.data.clone()


def prepare_base(model: nn.Module, base_dtype: str) -> nn.Module:
    """After loading in `LOAD_DTYPE[base_dtype]` and freezing: quantise for fp8 and cast inputs to the compute dtype."""
    if LOAD_DTYPE[base_dtype] != torch.float32:
        own_fp32_tensors(model)
    if base_dtype == "fp8":
        quantize_fp8(model, COMPUTE_DTYPE["fp8"])
    if COMPUTE_DTYPE[base_dtype] != torch.float32:
        cast_inputs(model, COMPUTE_DTYPE[base_dtype])
    return model


def base_bytes(model: nn.Module) -> int:
    """Bytes held by the frozen weights and buffers (works on the meta device)."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return frozen + sum(b.numel() * b.element_size() for b in model.buffers())
