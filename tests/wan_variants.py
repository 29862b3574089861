"""Tiny Wan pipelines besides text-to-video 2.1, saved with save_pretrained like the real ones.

Each reuses the tokenizer, text encoder and scheduler of the tiny Wan pipeline; what differs is what the real
checkpoints differ in: Wan 2.2 A14B's second transformer and boundary_ratio, image-to-video transformers (36 input
channels at full size: latents, mask and first-frame condition; Wan 2.1 also CLIP image embeddings), and TI2V-5B's
residual VAE with 16x spatial compression and per-token timesteps (`expand_timesteps`).
"""

from __future__ import annotations

import torch

CLIP_WIDTH = 16
"""Hidden size of the tiny CLIP vision encoder: the transformer's image_dim."""


def _transformer(seed: int, **overrides):
    from crepa.families import get_family

    adapter = get_family("wan")
    torch.manual_seed(seed)
    return adapter.transformer_class()(**(adapter.tiny_transformer_config() | overrides)).eval()


def _base_components(base: str) -> dict:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(base)
    return dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler)


def save_two_expert_pipeline(base: str, folder: str, boundary_ratio: float) -> str:
    """Wan 2.2 A14B text-to-video: `transformer` for t >= boundary_ratio * 1000, `transformer_2` below."""
    from diffusers import WanPipeline

    WanPipeline(**_base_components(base), transformer=_transformer(1), transformer_2=_transformer(2),
                boundary_ratio=boundary_ratio).save_pretrained(folder)
    return folder


def save_image_to_video_pipeline(base: str, folder: str) -> str:
    """Wan 2.1 I2V: input channels z + t_c + z (noise, mask, condition latents), CLIP image embeddings."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    components = _base_components(base)
    channels = components["vae"].config.z_dim
    transformer = _transformer(3, in_channels=2 * channels + components["vae"].config.scale_factor_temporal,
                               out_channels=channels, image_dim=CLIP_WIDTH, added_kv_proj_dim=16)
    torch.manual_seed(4)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=28, patch_size=14)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    WanImageToVideoPipeline(**components, image_encoder=encoder, image_processor=processor,
                            transformer=transformer).save_pretrained(folder)
    return folder


def save_ti2v_pipeline(base: str, folder: str) -> str:
    """Wan 2.2 TI2V-5B as text-to-video: a residual VAE (16x spatial, its own z_dim), per-token timesteps."""
    from diffusers import AutoencoderKLWan, WanPipeline

    components = _base_components(base)
    torch.manual_seed(5)
    channels = 6
    components["vae"] = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, latents_mean=[0.1 * i for i in range(channels)],
        latents_std=[1.0 + 0.1 * i for i in range(channels)]).eval()
    transformer = _transformer(6, in_channels=channels, out_channels=channels)
    WanPipeline(**components, transformer=transformer, expand_timesteps=True).save_pretrained(folder)
    return folder
