"""`load_base`: the frozen transformer loaded straight into its storage dtype, never whole in a wider one.

bf16, fp16 and fp32 load through diffusers' `from_pretrained(torch_dtype=...)`, which builds the model on the meta
device and casts each checkpoint tensor as it is read: the peak is the loaded model. For fp8 that path would hold the
whole model in bf16 and quantise it afterwards (twice the final size; what kills fp8 loads of Wan 14B on 32 GB hosts).
Instead the model is built on the meta device and its safetensors checkpoint read one tensor at a time, each into
memory of its own (a memory-mapped file's pages would count as this process's until it closes): every linear layer
that fp8 stores (`fp8_layers`) becomes an `Fp8Linear` as soon as its weight and bias are in, from the bf16 cast
`from_pretrained` would have made; every other tensor is cast to what `from_pretrained` gives it. The peak is the
final model plus one layer, and the weights are those of a plain load followed by `quantize_fp8`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import BinaryIO

import torch
from torch import nn

from crepa.families.loading import component_location, config_file, load_config, load_pretrained
from train.precision import COMPUTE_DTYPE, LOAD_DTYPE, Fp8Linear, fp8_layers

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_base(loader: type[nn.Module], model: str | None, subfolder: str, override: str | None,
              base_dtype: str) -> nn.Module:
    """The transformer in pipeline `model`'s `subfolder` (or the folder `override`) with its weights in
    `base_dtype`'s storage."""
    shards = _safetensors_shards(model, subfolder, override) if base_dtype == "fp8" else None
    if not shards:  # other dtypes, or a checkpoint in another format: diffusers' own narrow load
        return load_pretrained(loader, model, subfolder, override, torch_dtype=LOAD_DTYPE[base_dtype])
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers computed at init stay real
        transformer = loader.from_config(load_config(loader, model, subfolder, override))
    with contextlib.ExitStack() as files:
        tensors = SafetensorsReader([files.enter_context(open(shard, "rb")) for shard in shards])
        _fill(transformer, tensors, LOAD_DTYPE[base_dtype])
    return transformer.eval()


def _safetensors_shards(model: str | None, subfolder: str, override: str | None) -> list[str]:
    """The transformer's safetensors files (one, or the shards its index names); [] for another format."""
    path, subfolder = component_location(model, subfolder, override)
    single = config_file(path, subfolder or "", WEIGHTS)
    if single:
        return [single]
    index = config_file(path, subfolder or "", WEIGHTS_INDEX)
    if not index:
        return []
    with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(os.path.dirname(index), name) for name in names]


class SafetensorsReader:
    """Tensors of safetensors files by name, each read into its own fresh memory when asked for."""

    def __init__(self, files: list[BinaryIO]):
        self.entries: dict[str, tuple[BinaryIO, int, dict]] = {}
        for f in files:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self.entries |= {name: (f, 8 + size, info) for name, info in header.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        f, data_start, info = self.entries[name]
        begin, end = info["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        f.seek(data_start + begin)
        if f.readinto(data.numpy()) != end - begin:
            raise OSError(f"{f.name} is truncated: tensor {name} ends past the end of the file")
        return data.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _fill(model: nn.Module, tensors: SafetensorsReader, load_dtype: torch.dtype) -> None:
    """Replace `model`'s meta parameters and persistent buffers by the checkpoint's, fp8 layers quantised on arrival."""
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise OSError(f"the transformer checkpoint has no tensor {name}: it was saved from another model")
        value = tensors.read(name)
        if not value.is_floating_point():
            return value
        # the dtype diffusers' from_pretrained(torch_dtype=load_dtype) gives this tensor
        return value.to(torch.float32 if any(m in name.split(".") for m in keep_fp32) else load_dtype)

    quantised = fp8_layers(model)
    for name in quantised:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        linear.weight = nn.Parameter(read(f"{name}.weight"), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(read(f"{name}.bias"), requires_grad=False)
        setattr(parent, child, Fp8Linear(linear, COMPUTE_DTYPE["fp8"]))
    done = set(quantised)
    for name, tensor in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        module_name, _, attribute = name.rpartition(".")
        if module_name in done:
            continue
        module = model.get_submodule(module_name) if module_name else model
        if attribute in module._parameters:
            module._parameters[attribute] = nn.Parameter(read(name), requires_grad=tensor.requires_grad)
        else:
            module._buffers[attribute] = read(name)
