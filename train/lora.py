"""LoRA on the transformer through peft, saved in the diffusers format (and ComfyUI's on request)."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.base import FamilyAdapter
from train.experts import PRIMARY, component_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHTS = "lora_comfyui.safetensors"


def add_lora(transformer: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """Inject a trainable LoRA adapter; every base weight stays frozen."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                       init_lora_weights=True))
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if not trainable:
        raise UserError(f"--lora-target-modules {targets} matched no module of the transformer; "
                         "use names like to_q, to_k, to_v, to_out.0")
    for parameter in trainable:  # train the adapter in fp32 even when the base is bf16
        parameter.data = parameter.data.float()


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (without the `transformer.` prefix)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def lora_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """The modules peft wrapped with a LoRA, by their diffusers names."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in FamilyAdapter.unwrap(transformer).named_modules()
            if isinstance(module, LoraLayer)}


def check_comfyui_family(adapter: FamilyAdapter) -> None:
    """Refuse --comfyui-export for a family ComfyUI has no model of: no name written would be loaded anywhere."""
    if not adapter.comfyui_lora:
        raise UserError(f"--comfyui-export: ComfyUI has no {adapter.name} model that could load the LoRA",
                        fix=f"drop --comfyui-export; {LORA_WEIGHTS} loads with "
                            f"{adapter.pipeline_class_name}.load_lora_weights")


def check_comfyui_export(adapter: FamilyAdapter, transformer: nn.Module) -> dict[str, str]:
    """ComfyUI's name of every LoRA layer; refuses layers it has none for (its loader would skip them with a log
    line only)."""
    check_comfyui_family(adapter)
    names = adapter.comfyui_modules(transformer)
    missing = [name for name in lora_layers(transformer) if name not in names]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserError(f"--comfyui-export: ComfyUI's {adapter.name} model has no module for the LoRA layer(s) "
                         f"{shown}, so ComfyUI would skip them; drop them from --lora-target-modules or drop "
                         "--comfyui-export")
    return names


def comfyui_state_dict(adapter: FamilyAdapter, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter under ComfyUI's module names, as lora_A / lora_B weights with peft's scaling folded into lora_B.

    ComfyUI scales a LoRA by alpha / rank when it has an `.alpha` key and by 1 without one; no alpha is written
    because diffusers' loaders of several families (LTX-Video's among them) refuse keys that do not say "lora".
    """
    names = check_comfyui_export(adapter, transformer)
    state = {}
    for name, layer in lora_layers(transformer).items():
        comfy = names[name]
        state[f"{comfy}.lora_A.weight"] = layer.lora_A["default"].weight.detach().to("cpu").contiguous()
        state[f"{comfy}.lora_B.weight"] = (layer.lora_B["default"].weight.detach() *
                                           layer.scaling["default"]).to("cpu").contiguous()
    return state


def save_lora(adapter: FamilyAdapter, transformer: nn.Module, folder: str, rank: int, alpha: float,
              comfyui: bool, component: str = PRIMARY) -> str:
    """`pytorch_lora_weights.safetensors` loadable by the family pipeline's `load_lora_weights`.

    The LoRA of another pipeline component is `pytorch_lora_weights_<component>.safetensors` (Wan 2.2's low-noise
    expert: `load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)`), its ComfyUI copy likewise.
    The files are written in a temporary folder beside them and renamed into place, so a run cut short
    (a kill, a full disk) leaves the previous files whole instead of a truncated one under the final name.
    """
    import diffusers
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = lora_state_dict(transformer)
    pipeline = getattr(diffusers, adapter.pipeline_class_name)
    config = transformer.peft_config["default"]
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(config.target_modules),
                "lora_dropout": config.lora_dropout}
    weights = component_file(LORA_WEIGHTS, component)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        pipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name=weights,
                                   transformer_lora_adapter_metadata=metadata)
        if comfyui:
            save_file(comfyui_state_dict(adapter, transformer), os.path.join(tmp, component_file(COMFYUI_WEIGHTS,
                                                                                                 component)))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    return os.path.join(folder, weights)
