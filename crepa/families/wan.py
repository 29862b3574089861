"""Wan 2.1 / 2.2 text-to-video (WanTransformer3DModel, AutoencoderKLWan, UMT5)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from crepa.families.base import Conditioning, FamilyAdapter, TextEncoders


def _latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1, 1) mean and std the Wan pipeline normalises latents with."""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


# diffusers module (a full-name pattern) -> the module of ComfyUI's native Wan model (comfy/ldm/wan/model.py).
# These are all the layers a LoRA can wrap: the Conv3d patch embedding and every Linear. Norms and the
# modulation tables (scale_shift_table, native `modulation`) are no LoRA targets.
_COMFYUI_MODULES = (
    (r"patch_embedding", r"patch_embedding"),
    (r"condition_embedder\.text_embedder\.linear_1", r"text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", r"text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", r"time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", r"time_embedding.2"),
    (r"condition_embedder\.time_proj", r"time_projection.1"),
    (r"blocks\.(\d+)\.attn1\.to_q", r"blocks.\1.self_attn.q"),
    (r"blocks\.(\d+)\.attn1\.to_k", r"blocks.\1.self_attn.k"),
    (r"blocks\.(\d+)\.attn1\.to_v", r"blocks.\1.self_attn.v"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_q", r"blocks.\1.cross_attn.q"),
    (r"blocks\.(\d+)\.attn2\.to_k", r"blocks.\1.cross_attn.k"),
    (r"blocks\.(\d+)\.attn2\.to_v", r"blocks.\1.cross_attn.v"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"proj_out", r"head.head"),
)
# Image-to-video only: ComfyUI builds these when the weights hold an image embedder (`img_emb`), so a model
# with image keys/values but no image embedder loads there as text-to-video, without k_img / v_img.
_COMFYUI_IMAGE_MODULES = (
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", r"img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", r"img_emb.proj.3"),
    (r"blocks\.(\d+)\.attn2\.add_k_proj", r"blocks.\1.cross_attn.k_img"),
    (r"blocks\.(\d+)\.attn2\.add_v_proj", r"blocks.\1.cross_attn.v_img"),
)


class WanAdapter(FamilyAdapter):
    name = "wan"
    transformer_class_name = "WanTransformer3DModel"
    block_list_attr = "blocks"
    vae_class_name = "AutoencoderKLWan"
    latents_normalisation = "(z - latents_mean) / latents_std, as the diffusers pipeline"
    text_encoder_classes = {"text_encoder": "UMT5EncoderModel"}
    pipeline_class_name = "WanPipeline"
    default_text_max_length = 512
    default_flow_shift = 3.0
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.unwrap(transformer).config.patch_size
        _, _, frames, height, width = latent_shape
        return frames // p_t, height // p_h, width // p_w

    def vae_compression(self, vae_config: dict) -> tuple[int, int]:
        temporal = vae_config.get("scale_factor_temporal") or 2 ** sum(vae_config["temperal_downsample"])
        spatial = vae_config.get("scale_factor_spatial") or 2 ** len(vae_config["temperal_downsample"])
        return int(temporal), int(spatial)

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = distribution.sample(generator) if sample else distribution.mode()
        mean, std = _latent_stats(vae, latents)
        return (latents - mean) / std

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        mean, std = _latent_stats(vae, latents)
        return vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]

    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        text_encoder = encoders["text_encoder"]
        tokens = encoders["tokenizer"](
            [prompt_clean(c) for c in captions], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = next(text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        return [{"embeds": h[:n]} for h, n in zip(hidden, lengths.tolist(), strict=True)]

    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        # Wan attends to the zero-padded text tokens without a mask, exactly as its pipeline does.
        return dict(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=conditioning.text,
                    return_dict=False)

    def text_embedding_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.text_dim

    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        model = self.unwrap(transformer)
        table = _COMFYUI_MODULES + (_COMFYUI_IMAGE_MODULES if model.config.image_dim else ())
        names = {}
        for name, _ in model.named_modules():
            for ours, theirs in table:
                match = re.fullmatch(ours, name)
                if match:
                    names[name] = "diffusion_model." + match.expand(theirs)
        return names

    def tiny_transformer_config(self) -> dict:
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
        )

    def tiny_vae_config(self) -> dict:
        return dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                    latents_std=[1.5, 0.8, 1.0, 1.2])

    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        from transformers import UMT5Config

        return UMT5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
