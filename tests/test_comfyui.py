"""The ComfyUI export judged by ComfyUI's rules for Wan and LTX-Video LoRAs, not by diffusers' converters.

ComfyUI patches a weight only when a LoRA key is `diffusion_model.<native module>` plus `.lora_up.weight` /
`.lora_down.weight` (or `.lora_B.weight` / `.lora_A.weight`), optionally with `.alpha`; the change it applies is
alpha / rank * up.flatten(1) @ down.flatten(1) (1 * up @ down without an alpha), reshaped to the native weight.
Any other key is skipped with a log line, so a wrong name silently weakens the LoRA.
"""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from crepa.families import get_family
from train.config import TrainConfig
from train.lora import COMFYUI_WEIGHTS, add_lora, check_comfyui_export, save_lora
from train.trainer import run_train

ROLES = {"lora_up.weight": "up", "lora_B.weight": "up", "lora_down.weight": "down", "lora_A.weight": "down",
         "alpha": "alpha"}


def native_wan_weights(config) -> dict[str, tuple[int, ...]]:
    """Weight shape of every module of ComfyUI's WanModel (comfy/ldm/wan/model.py) a LoRA can patch.

    Norms and modulation tables are left out: they are not layers a LoRA factorises.
    The image parts (img_emb, k_img, v_img) exist only in the image-to-video model.
    """
    dim = config.num_attention_heads * config.attention_head_dim
    patch = tuple(config.patch_size)
    shapes = {
        "patch_embedding": (dim, config.in_channels, *patch),
        "text_embedding.0": (dim, config.text_dim), "text_embedding.2": (dim, dim),
        "time_embedding.0": (dim, config.freq_dim), "time_embedding.2": (dim, dim),
        "time_projection.1": (6 * dim, dim),
        "head.head": (config.out_channels * math.prod(patch), dim),
    }
    for i in range(config.num_layers):
        for attention in ("self_attn", "cross_attn"):
            shapes |= {f"blocks.{i}.{attention}.{p}": (dim, dim) for p in "qkvo"}
        shapes[f"blocks.{i}.ffn.0"] = (config.ffn_dim, dim)
        shapes[f"blocks.{i}.ffn.2"] = (dim, config.ffn_dim)
        if config.image_dim:
            shapes |= {f"blocks.{i}.cross_attn.{p}": (dim, dim) for p in ("k_img", "v_img")}
    if config.image_dim:
        shapes["img_emb.proj.1"] = (config.image_dim, config.image_dim)
        shapes["img_emb.proj.3"] = (dim, config.image_dim)
    return shapes


def comfyui_patches(state: dict[str, torch.Tensor], native: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The weight change ComfyUI's loader applies to each native module; fails on every key it would skip."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        found = [(key[: -len(suffix) - 1], role) for suffix, role in ROLES.items() if key.endswith("." + suffix)]
        assert found, f"{key}: no LoRA suffix ComfyUI reads"
        base, role = found[0]
        assert base.startswith("diffusion_model."), f"{key}: ComfyUI's LoRA names start with diffusion_model."
        name = base.removeprefix("diffusion_model.")
        assert name in native, f"{key}: ComfyUI's model has no module {name}, its loader skips this key"
        assert role not in parts.get(name, {}), f"{key}: a second {role} for {name}"
        parts.setdefault(name, {})[role] = value
    patches = {}
    for name, tensors in parts.items():
        assert {"up", "down"} <= set(tensors), f"{name}: has {sorted(tensors)}, needs up and down"
        up, down = tensors["up"].flatten(1), tensors["down"].flatten(1)
        shape = native[name]
        assert (up.shape[0], down.shape[1]) == (shape[0], math.prod(shape[1:])), \
            f"{name}: LoRA {tuple(up.shape)} x {tuple(down.shape)} does not fit ComfyUI's weight {shape}"
        scale = 1.0
        if "alpha" in tensors:
            assert tensors["alpha"].numel() == 1, f"{name}.alpha is not a scalar"
            scale = tensors["alpha"].item() / down.shape[0]
        patches[name] = scale * (up @ down).reshape(shape)
    return patches


def native_ltxv_weights(config) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear of ComfyUI's LTXVModel (comfy/ldm/lightricks/model.py): the input projection is
    `patchify_proj`, the timestep embedding `adaln_single` (256 sinusoidal channels in), the feed-forward 4x wide."""
    dim = config.num_attention_heads * config.attention_head_dim
    shapes = {
        "patchify_proj": (dim, config.in_channels),
        "adaln_single.emb.timestep_embedder.linear_1": (dim, 256),
        "adaln_single.emb.timestep_embedder.linear_2": (dim, dim),
        "adaln_single.linear": (6 * dim, dim),
        "caption_projection.linear_1": (dim, config.caption_channels),
        "caption_projection.linear_2": (dim, dim),
        "proj_out": (config.out_channels, dim),
    }
    for i in range(config.num_layers):
        for attention, context in (("attn1", dim), ("attn2", config.cross_attention_dim)):
            shapes |= {f"transformer_blocks.{i}.{attention}.to_q": (dim, dim),
                       f"transformer_blocks.{i}.{attention}.to_k": (dim, context),
                       f"transformer_blocks.{i}.{attention}.to_v": (dim, context),
                       f"transformer_blocks.{i}.{attention}.to_out.0": (dim, dim)}
        shapes[f"transformer_blocks.{i}.ff.net.0.proj"] = (4 * dim, dim)
        shapes[f"transformer_blocks.{i}.ff.net.2"] = (dim, 4 * dim)
    return shapes


def export_every_layer(family: str, model: nn.Module, folder: str, targets: tuple[type, ...] = (nn.Linear,)):
    """A LoRA on every `targets` module of `model`, each with its own random change, saved with the ComfyUI export;
    returns (the LoRA layers by diffusers name, the ComfyUI file's tensors)."""
    adapter = get_family(family)
    names = [name for name, module in model.named_modules() if isinstance(module, targets)]
    add_lora(model, 4, 8.0, 0.0, names)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(names)
    check_comfyui_export(adapter, model)  # every layer has a ComfyUI name
    with torch.no_grad():
        for layer in layers.values():  # B starts at zero; give every module its own change
            layer.lora_B["default"].weight.normal_()
    save_lora(adapter, model, folder, 4, 8.0, comfyui=True)
    return layers, load_file(os.path.join(folder, COMFYUI_WEIGHTS))


def tiny_wan(i2v: bool) -> nn.Module:
    """A tiny Wan whose widths all differ, so a LoRA under a swapped name no longer fits the weight."""
    adapter = get_family("wan")
    config = adapter.tiny_transformer_config() | dict(text_dim=12, freq_dim=8, ffn_dim=24, num_layers=2)
    if i2v:  # Wan 2.1 I2V: CLIP image features, image keys and values as wide as the model
        config |= dict(image_dim=20, added_kv_proj_dim=16)
    torch.manual_seed(0)
    return adapter.transformer_class()(**config)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_comfyui_export_of_every_layer_follows_comfyuis_wan_rules(tmp_path, i2v):
    model = tiny_wan(i2v)
    layers, state = export_every_layer("wan", model, str(tmp_path), (nn.Linear, nn.Conv3d))
    native = native_wan_weights(model.config)
    patches = comfyui_patches(state, native)
    assert sorted(patches) == sorted(native), "every native layer is trained, so every one must be in the file"

    # each native patch is exactly one trained module's change, alpha / rank included
    expected = {name: layer.get_delta_weight("default") for name, layer in layers.items()}
    source = {}
    for name, patch in patches.items():
        same = [ours for ours, delta in expected.items()
                if delta.shape == patch.shape and torch.allclose(delta, patch, rtol=1e-4, atol=1e-6)]
        assert len(same) == 1, f"{name}: matches {same} of the trained modules"
        source[name] = same[0]
    assert sorted(source.values()) == sorted(expected)
    # modules of equal shape: their names must pair up too
    projections = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "k_img": "add_k_proj",
                   "v_img": "add_v_proj"}
    attentions = {"self_attn": "attn1", "cross_attn": "attn2"}
    paired = 0
    for name, ours in source.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[2] in attentions:
            _, block, attention, projection = parts
            assert ours == f"blocks.{block}.{attentions[attention]}.{projections[projection]}", f"{name} holds {ours}"
            paired += 1
    assert paired == model.config.num_layers * (10 if i2v else 8)


def test_comfyui_export_of_every_layer_follows_comfyuis_ltxv_rules(tmp_path):
    adapter = get_family("ltxvideo")
    torch.manual_seed(0)
    model = adapter.transformer_class()(**(adapter.tiny_transformer_config() | dict(num_layers=2)))
    layers, state = export_every_layer("ltxvideo", model, str(tmp_path))
    native = native_ltxv_weights(model.config)
    patches = comfyui_patches(state, native)
    assert sorted(patches) == sorted(native), "every native layer is trained, so every one must be in the file"
    # ComfyUI's LTXV names are the diffusers ones but for the input projection and the timestep embedding; the file
    # holds each diffusers module's change, alpha / rank included, under the name of the module it belongs to
    diffusers_name = {"patchify_proj": "proj_in", "adaln_single": "time_embed"}
    for name, patch in patches.items():
        head, _, rest = name.partition(".")
        ours = ".".join(filter(None, (diffusers_name.get(head, head), rest)))
        torch.testing.assert_close(patch, layers[ours].get_delta_weight("default"), rtol=1e-4, atol=1e-6)


def test_a_target_comfyui_cannot_load_is_refused_before_training(tmp_path, trained_cache, tiny_models):
    adapter = get_family("wan")
    # image keys and values without an image embedder: ComfyUI loads such weights as a text-to-video Wan,
    # which has no k_img / v_img for these LoRA layers
    model = adapter.transformer_class()(**(adapter.tiny_transformer_config() | {"added_kv_proj_dim": 16}))
    model.save_pretrained(str(tmp_path / "kv"))
    out = tmp_path / "run"
    config = TrainConfig(cache=trained_cache, family="wan", model=tiny_models["wan"], transformer=str(tmp_path / "kv"),
                         output_dir=str(out), crepa_block_index=1, max_train_steps=2, dataloader_num_workers=0,
                         report_to="none", lora_rank=4, lora_target_modules=["to_q", "add_k_proj"],
                         comfyui_export=True)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn2\.add_k_proj.*drop .*--comfyui-export"):
        run_train(config)
    assert not os.path.exists(out / "metrics.jsonl")
    assert not glob.glob(str(out / "checkpoint-*"))
