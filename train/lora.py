"""LoRA on the transformer through peft, saved in the diffusers format (and ComfyUI's on request)."""

from __future__ import annotations

import os

import torch
from torch import nn

from crepa.families.base import FamilyAdapter

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
        raise ValueError(f"--lora-target-modules {targets} matched no module of the transformer; "
                         "use names like to_q, to_k, to_v, to_out.0")
    for parameter in trainable:  # train the adapter in fp32 even when the base is bf16
        parameter.data = parameter.data.float()


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (without the `transformer.` prefix)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(adapter: FamilyAdapter, transformer: nn.Module, folder: str, rank: int, alpha: float,
              comfyui: bool) -> str:
    """`pytorch_lora_weights.safetensors` loadable by the family pipeline's `load_lora_weights`."""
    import diffusers
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = lora_state_dict(transformer)
    pipeline = getattr(diffusers, adapter.pipeline_class_name)
    config = transformer.peft_config["default"]
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(config.target_modules),
                "lora_dropout": config.lora_dropout}
    pipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=LORA_WEIGHTS,
                               transformer_lora_adapter_metadata=metadata)
    if comfyui:
        comfy = {}
        for key, value in state.items():
            comfy[adapter.comfyui_lora_key(key)] = value
            if key.endswith("lora_A.weight"):
                comfy[adapter.comfyui_lora_key(key.removesuffix("lora_A.weight") + "alpha")] = torch.tensor(
                    float(alpha))
        save_file(comfy, os.path.join(folder, COMFYUI_WEIGHTS))
    return os.path.join(folder, LORA_WEIGHTS)
