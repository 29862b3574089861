"""Kandinsky 5 facts the shared conformance suite does not reach: sparse (nabla) attention's token order, two text
encoders, ComfyUI's names for its layers, and a tiny model that is more than the identity."""

from __future__ import annotations

import math
import os

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from safetensors.torch import load_file
from test_comfyui import comfyui_patches
from torch import nn

from crepa.capture import BlockCapture
from crepa.families import Conditioning, get_family
from train.lora import COMFYUI_WEIGHTS, add_lora, lora_layers, save_lora

FAMILY = "kandinsky5_video"
NABLA = dict(attention_type="nabla", attention_P=0.9, attention_wT=3, attention_wH=3, attention_wW=3,
             attention_add_sta=True, attention_method="topcdf")
"""Sparse attention settings of the kind Kandinsky 5's 10 s checkpoints use."""


def tiny(sparse: bool) -> nn.Module:
    adapter = get_family(FAMILY)
    torch.manual_seed(0)
    if not sparse:
        return adapter.tiny_transformer()
    model = adapter.transformer_class()(**(adapter.tiny_transformer_config() | NABLA)).eval()
    model.load_state_dict(adapter.tiny_transformer().state_dict())  # the same randomised modulation
    return model


def inputs(transformer: nn.Module, latents: torch.Tensor) -> dict:
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(1, 5, 16, generator=generator)
    conditioning = Conditioning(text, torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 8, generator=generator))
    return get_family(FAMILY).transformer_kwargs(transformer, latents, torch.tensor([700.0]), conditioning)


def test_sparse_attention_tokens_map_back_as_diffusers_tiles_them():
    from diffusers.models.transformers.transformer_kandinsky import fractal_flatten

    adapter = get_family(FAMILY)
    grid = torch.randn(2, 3, 16, 24, 5)  # (B, F, hs, ws, D): 2 x 3 tiles of 8 x 8 a frame
    for sparse in (False, True):
        tokens, _ = fractal_flatten(grid, grid.clone(), grid.shape[:-1], block_mask=sparse)
        assert tokens.shape == (2, 3 * 16 * 24, 5)
        assert sparse == (not torch.equal(tokens, grid.flatten(1, 3)))
        torch.testing.assert_close(adapter.tokens_to_grid(tiny(sparse), tokens, (3, 16, 24)), grid, rtol=0, atol=0)


class _Stop(Exception):
    """Ends a forward once the block input is in hand (sparse attention would need flex attention after it)."""


def first_block_input(transformer: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    seen = []

    def keep(_module, args, _kwargs):
        seen.append(args[0])
        raise _Stop

    hook = get_family(FAMILY).blocks(transformer)[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            transformer(**inputs(transformer, latents))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("sparse", [False, True], ids=["regular", "sparse"])
def test_a_planted_latent_lands_at_its_place_in_both_token_orders(sparse):
    adapter = get_family(FAMILY)
    transformer = tiny(sparse)
    latents = torch.randn(1, 4, 2, 32, 48)  # token grid 2 x 16 x 24: tiles of 8 x 8 in sparse mode
    grid = adapter.token_grid(transformer, latents.shape)
    base = adapter.tokens_to_grid(transformer, first_block_input(transformer, latents), grid)
    for t, h, w in [(1, 0, 0), (0, 31, 0), (0, 0, 47), (1, 17, 30), (0, 9, 2)]:
        planted = latents.clone()
        planted[:, :, t, h, w] += 10.0
        tokens = adapter.tokens_to_grid(transformer, first_block_input(transformer, planted), grid)
        changed = (tokens - base).abs().amax(dim=(0, 4)).gt(1e-6).nonzero().tolist()
        assert changed == [[t, h // 2, w // 2]], (t, h, w)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("sparse", [False, True], ids=["regular", "sparse"])
def test_captured_block_output_is_what_the_model_unflattens(sparse):
    """The last block's output as CREPA reads it equals the (B, F, hs, ws, D) the model hands its output layer."""
    adapter = get_family(FAMILY)
    transformer = tiny(sparse)
    default = _AttentionBackendRegistry.get_active_backend()[0]
    adapter.set_attention_backend(transformer)
    assert _AttentionBackendRegistry.get_active_backend()[0] == default, "other models keep the default backend"
    latents = torch.randn(1, 4, 2, 16, 32)  # token grid 2 x 8 x 16: the 64-token blocks sparse attention needs
    unflattened = []
    hook = transformer.out_layer.register_forward_pre_hook(lambda module, args: unflattened.append(args[0]))
    last = len(adapter.blocks(transformer)) - 1
    try:
        with torch.no_grad(), BlockCapture(adapter, transformer, block_index=last) as capture:
            transformer(**inputs(transformer, latents))
            student = capture.student(latents.shape)
    finally:
        hook.remove()
    assert student.shape == (1, 2, 8, 16, 16)
    torch.testing.assert_close(student, unflattened[0], rtol=0, atol=0)


def test_the_tiny_transformer_is_not_the_identity():
    """Modulation starts at zero in diffusers, which makes every block pass its input through unchanged."""
    adapter = get_family(FAMILY)
    transformer = adapter.tiny_transformer()
    block = adapter.blocks(transformer)[0]
    seen = []
    hook = block.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    with torch.no_grad():
        transformer(**inputs(transformer, torch.randn(1, 4, 2, 6, 8)))
    hook.remove()
    block_in, block_out = seen[0]
    assert (block_out - block_in).abs().amax() > 0.1


def test_text_of_each_caption_is_the_pipelines_for_that_prompt_alone(tiny_pipelines):
    """Captions of different lengths encoded together, one of them cut at max_length, as the pipeline encodes each."""
    from diffusers import Kandinsky5T2VPipeline

    adapter = get_family(FAMILY)
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_pipelines(FAMILY))
    encoders = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    captions = ["a red circle", "two blue squares sliding slowly over a light scene with a yellow ball", "video"]
    with torch.no_grad():
        ours = adapter.encode_text(encoders, captions, max_length=8)
        for caption, arrays in zip(captions, ours, strict=True):
            embeds, pooled, cu_seqlens = pipe.encode_prompt(caption, max_sequence_length=8, device="cpu")
            assert arrays["embeds"].shape[0] == cu_seqlens[-1] <= 8
            torch.testing.assert_close(arrays["embeds"], embeds[0], rtol=0, atol=0)
            torch.testing.assert_close(arrays["pooled"], pooled[0], rtol=0, atol=0)
    assert len({arrays["embeds"].shape[0] for arrays in ours}) == 3
    assert ours[1]["embeds"].shape[0] == 8  # cut


def test_the_text_set_is_keyed_by_both_encoders_and_tokenizers(tiny_pipelines, tmp_path):
    import shutil

    from precompute.config import PrecomputeConfig
    from precompute.feature_sets import text_identity

    adapter = get_family(FAMILY)
    model = str(tmp_path / "pipe")
    shutil.copytree(tiny_pipelines(FAMILY), model)
    config = PrecomputeConfig(dataset_config="d.toml", family=FAMILY, out=str(tmp_path / "cache"), model=model)
    before = text_identity(adapter, config, "float32", 512)
    assert {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"} <= set(before)
    # and by what the pipeline does to a caption outside those files: its prompt template and the prefix it cuts
    assert before["text_settings"]["prompt_template"].endswith("<|im_start|>user\n{}<|im_end|>")
    assert before["text_settings"]["prompt_template_encode_start_idx"] == 128
    for subfolder in ("tokenizer_2", "text_encoder_2"):
        with open(os.path.join(model, subfolder, "extra.json"), "w") as f:
            f.write("{}")
        after = text_identity(adapter, config, "float32", 512)
        assert after[subfolder] != before[subfolder]
        before = after


def native_kandinsky5_weights(config) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear of ComfyUI's Kandinsky5 model (comfy/ldm/kandinsky5/model.py)."""
    dim, time, ff = config.model_dim, config.time_dim, config.ff_dim
    patch = math.prod(config.patch_size)
    channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
    shapes = {
        "time_embeddings.in_layer": (time, dim), "time_embeddings.out_layer": (time, time),
        "text_embeddings.in_layer": (dim, config.in_text_dim),
        "pooled_text_embeddings.in_layer": (time, config.in_text_dim2),
        "visual_embeddings.in_layer": (dim, patch * channels),
        "out_layer.modulation.out_layer": (2 * dim, time),
        "out_layer.out_layer": (patch * config.out_visual_dim, dim),
    }
    blocks = [("text", i, ("self",), 6) for i in range(config.num_text_blocks)]
    blocks += [("visual", i, ("self", "cross"), 9) for i in range(config.num_visual_blocks)]
    for kind, i, attentions, modulations in blocks:
        prefix = f"{kind}_transformer_blocks.{i}"
        shapes[f"{prefix}.{kind}_modulation.out_layer"] = (modulations * dim, time)
        for attention in attentions:
            shapes |= {f"{prefix}.{attention}_attention.{p}": (dim, dim)
                       for p in ("to_query", "to_key", "to_value", "out_layer")}
        shapes[f"{prefix}.feed_forward.in_layer"] = (ff, dim)
        shapes[f"{prefix}.feed_forward.out_layer"] = (dim, ff)
    return shapes


def test_comfyui_export_of_every_layer_follows_comfyuis_kandinsky5_rules(tmp_path):
    adapter = get_family(FAMILY)
    # every width differs, so a LoRA under another layer's name no longer fits its weight
    config = adapter.tiny_transformer_config() | dict(in_text_dim=12, in_text_dim2=6, time_dim=20, ff_dim=24,
                                                      num_text_blocks=2, num_visual_blocks=2)
    torch.manual_seed(0)
    model = adapter.transformer_class()(**config)
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    add_lora(model, 4, 8.0, 0.0, targets)
    layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_()
    save_lora(adapter, model, str(tmp_path), 4, 8.0, comfyui=True)

    native = native_kandinsky5_weights(model.config)
    patches = comfyui_patches(load_file(os.path.join(tmp_path, COMFYUI_WEIGHTS)), native)
    assert sorted(patches) == sorted(native) == sorted(layers), "ComfyUI's layers are diffusers' layers, by name"
    for name, patch in patches.items():
        torch.testing.assert_close(patch, layers[name].get_delta_weight("default"), rtol=1e-4, atol=1e-6)


def test_a_bucket_sparse_attention_cannot_tile_is_refused_before_models_load(tiny_pipelines, tmp_path):
    import json
    import shutil

    from conftest import write_dataset

    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute

    model = str(tmp_path / "sparse")
    shutil.copytree(tiny_pipelines(FAMILY), model)
    config_path = os.path.join(model, "transformer", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(config | NABLA, f)
    # 64x48 pixels are 4x3 tokens: fine for dense attention, not for sparse attention's 8x8 token tiles
    config = PrecomputeConfig(dataset_config=write_dataset(tmp_path, clips=1), family=FAMILY,
                              out=str(tmp_path / "cache"), model=model, device="cpu", decode_workers=0,
                              teacher=TeacherSettings(encoder="nowhere", image_size=56))
    with pytest.raises(ValueError, match=r"resolution \[64, 48\] is not a multiple of 128"):
        run_precompute(config)
    assert not os.path.exists(tmp_path / "cache")


def test_a_dropped_caption_runs_with_the_empty_prompts_length():
    """Unpadded text: a clip whose caption dropout replaces by the empty prompt joins the forward of that prompt's
    length, not its own caption's (whose cut would hand the transformer padding after the empty prompt)."""
    from train.trainer import forward_runs

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    batch = {"keys": ["a", "b", "c"], "text_mask": mask, "latents": torch.arange(3.0)}
    sorted_batch, runs = forward_runs(get_family(FAMILY), batch, ([False, False, True], 2))
    assert sorted_batch["keys"] == ["c", "b", "a"]
    assert [(rows.start, rows.stop, tokens) for rows, tokens in runs] == [(0, 1, 2), (1, 2, 3), (2, 3, 5)]
    _, undropped = forward_runs(get_family(FAMILY), batch)
    assert [tokens for _, tokens in undropped] == [3, 5]


def pipeline_text(arrays: dict, prefix: str) -> dict:
    """Kandinsky5T2VPipeline's precomputed-text arguments (`prompt_...` or `negative_prompt_...`) for one prompt."""
    return {f"{prefix}prompt_embeds_qwen": arrays["text"][None],
            f"{prefix}prompt_embeds_clip": arrays["text_pooled"][None],
            f"{prefix}prompt_cu_seqlens": torch.tensor([0, len(arrays["text"])], dtype=torch.int32)}


def test_validation_samples_what_the_pipeline_generates_from_the_same_text(tiny_pipelines):
    """Validation sampling from the cached (padded) text of a prompt and of the empty prompt of guidance gives the
    latents the pipeline generates from the same embeddings."""
    from diffusers import Kandinsky5T2VPipeline

    from train.data import prompt_conditioning
    from train.validation import flow_sigmas, initial_noise, sample_flow

    adapter = get_family(FAMILY)
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_pipelines(FAMILY))
    encoders = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    with torch.no_grad():
        prompt, empty = ({"text": arrays["embeds"], "text_pooled": arrays["pooled"]}
                         for arrays in adapter.encode_text(encoders, ["a red ball bouncing", ""], 512))
        noise = initial_noise(0, (4, 3, 6, 8))
        ours = sample_flow(adapter, lambda sigma: pipe.transformer, noise, flow_sigmas(3, 5.0, pipe.scheduler.config),
                           prompt_conditioning([prompt], 512), prompt_conditioning([empty], 512), guidance=4.0)
        start = adapter.transformer_kwargs(pipe.transformer, noise, torch.ones(1), Conditioning(
            prompt["text"][None], torch.ones(1, len(prompt["text"]), dtype=torch.bool), prompt["text_pooled"][None]))
        theirs = pipe(**pipeline_text(prompt, ""), **pipeline_text(empty, "negative_"), height=48, width=64,
                      num_frames=9, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                      latents=start["hidden_states"]).frames
    torch.testing.assert_close(ours, theirs.movedim(-1, 1), rtol=1e-4, atol=1e-5)
