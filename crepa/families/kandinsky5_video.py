"""Kandinsky 5 text-to-video, Lite and Pro (Kandinsky5Transformer3DModel, AutoencoderKLHunyuanVideo,
Qwen2.5-VL and CLIP-L text encoders), as diffusers' Kandinsky5T2VPipeline runs them.

What sets the family apart: the transformer works channels-last (B, F, H, W, C) and returns a bare tensor; it
takes no text mask, so text is never padded (`text_padding = False`); `visual_cond` checkpoints take the latents
plus a zero conditioning copy and a zero mask (2C + 1 channels) for text-to-video; and in sparse (nabla)
attention its blocks hold the video tokens in 8x8 tiles instead of raster order.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from crepa.families.base import Conditioning, FamilyAdapter, TextEncoders

TILE = 8
"""Side of the spatial tiles (in tokens) that sparse attention orders a frame's tokens by (diffusers'
`fractal_flatten`): token order (t, h // 8, w // 8, h % 8, w % 8)."""
PIXELS_PER_LATENT = 8
"""Spatial compression of the HunyuanVideo VAE (its config's `spatial_compression_ratio`): the pipeline picks the
rope scale from the pixel size, which the transformer's inputs know only through the latents."""

_LINEAR_LAYERS = "|".join((
    r"time_embeddings\.(in|out)_layer",
    r"(pooled_)?text_embeddings\.in_layer",
    r"visual_embeddings\.in_layer",
    r"(text|visual)_transformer_blocks\.\d+\.(text|visual)_modulation\.out_layer",
    r"(text|visual)_transformer_blocks\.\d+\.(self|cross)_attention\.(to_query|to_key|to_value|out_layer)",
    r"(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in|out)_layer",
    r"out_layer\.(modulation\.)?out_layer",
))
"""Every nn.Linear of Kandinsky5Transformer3DModel (its norms are no LoRA targets), by full name."""


def _pipeline_helper(transformer: nn.Module) -> Any:
    """What Kandinsky5T2VPipeline's own input builders (`get_sparse_params`, `_get_scale_factor`) read from `self`."""
    from diffusers import Kandinsky5T2VPipeline

    return SimpleNamespace(transformer=transformer, fast_sta_nabla=Kandinsky5T2VPipeline.fast_sta_nabla)


def text_pipeline(encoders: TextEncoders) -> Any:
    """A Kandinsky5T2VPipeline holding only the text encoders and tokenizers, for its `encode_prompt`."""
    from diffusers import Kandinsky5T2VPipeline

    return Kandinsky5T2VPipeline(transformer=None, vae=None, scheduler=None, **encoders)


class Kandinsky5VideoAdapter(FamilyAdapter):
    name = "kandinsky5_video"
    transformer_class_name = "Kandinsky5Transformer3DModel"
    block_list_attr = "visual_transformer_blocks"
    vae_class_name = "AutoencoderKLHunyuanVideo"
    latents_normalisation = "z * scaling_factor (the VAE config's), which the pipeline divides out before vae.decode"
    text_encoder_classes = {"text_encoder": "Qwen2_5_VLForConditionalGeneration", "text_encoder_2": "CLIPTextModel"}
    pipeline_class_name = "Kandinsky5T2VPipeline"
    default_text_max_length = 512  # Kandinsky5T2VPipeline.__call__'s max_sequence_length
    default_flow_shift = 5.0
    # attention only: `out_layer` alone would also take the feed-forward, time, modulation and output layers
    default_lora_targets = ("to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer")
    default_crepa_block = 8  # a quarter of the way into Lite's 32 blocks
    text_padding = False

    def latent_channels(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.in_visual_dim

    def attention_backend(self, transformer: nn.Module) -> str | None:
        # nabla builds a flex-attention block mask; the default backend cannot take it
        return "flex" if self.token_multiple(self.unwrap(transformer).config) > 1 else None

    def token_multiple(self, transformer_config: dict) -> int:
        return TILE if transformer_config.get("attention_type") == "nabla" else 1

    def vae_compression(self, vae_config: dict) -> tuple[int, int]:
        return int(vae_config["temporal_compression_ratio"]), int(vae_config["spatial_compression_ratio"])

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = distribution.sample(generator) if sample else distribution.mode()
        return latents * vae.config.scaling_factor

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]

    def text_settings(self) -> dict:
        # the Qwen prompt template and the prefix cut after encoding live in the pipeline's code, not in its files
        pipeline = text_pipeline(dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")))
        return {"prompt_template": pipeline.prompt_template,
                "prompt_template_encode_start_idx": pipeline.prompt_template_encode_start_idx}

    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        """The pipeline's own `encode_prompt`, one caption at a time as the pipeline encodes a prompt: in a batch its
        truncation and padding would make a caption's embeddings depend on its neighbours."""
        pipeline = text_pipeline(encoders)
        device = next(encoders["text_encoder"].parameters()).device
        encoded = []
        for caption in captions:
            embeds, pooled, _ = pipeline.encode_prompt(caption, max_sequence_length=max_length, device=device)
            encoded.append({"embeds": embeds[0], "pooled": pooled[0]})
        return encoded

    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        """As the pipeline's text-to-video `__call__`. The text is each caption's own tokens, unpadded (the trainer
        runs each caption length as its own forward, `text_padding = False`)."""
        from diffusers import Kandinsky5T2VPipeline

        model = self.unwrap(transformer)
        config = model.config
        latents = noisy_latents.movedim(1, -1)  # (B, F, H, W, C)
        if config.visual_cond:  # text-to-video: a zero conditioning copy and a zero mask
            latents = torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[..., :1])], dim=-1)
        _, frames, height, width, _ = latents.shape
        _, patch_h, patch_w = config.patch_size
        device = latents.device
        helper = _pipeline_helper(model)
        return dict(
            hidden_states=latents, encoder_hidden_states=conditioning.text, timestep=timesteps,
            pooled_projections=conditioning.text_pooled,
            visual_rope_pos=[torch.arange(frames, device=device), torch.arange(height // patch_h, device=device),
                             torch.arange(width // patch_w, device=device)],
            text_rope_pos=torch.arange(conditioning.text.shape[1], device=device),
            scale_factor=Kandinsky5T2VPipeline._get_scale_factor(helper, height * PIXELS_PER_LATENT,
                                                                 width * PIXELS_PER_LATENT),
            sparse_params=Kandinsky5T2VPipeline.get_sparse_params(helper, latents, device),
            return_dict=False,
        )

    def prediction(self, output: Any, latent_shape: torch.Size) -> torch.Tensor:
        """The channels-last (B, F, H, W, C) output (a bare tensor, `.sample` with return_dict) as (B, C, F, H, W)."""
        sample = output if isinstance(output, torch.Tensor) else output.sample
        return super().prediction(sample.movedim(-1, 1), latent_shape)

    def text_embedding_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.in_text_dim

    def pooled_embedding_dim(self, transformer: nn.Module) -> int | None:
        return self.unwrap(transformer).config.in_text_dim2

    def hidden_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.model_dim

    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.unwrap(transformer).config.patch_size
        _, _, frames, height, width = latent_shape
        return frames // p_t, height // p_h, width // p_w

    def tokens_to_grid(self, transformer: nn.Module, tokens: torch.Tensor,
                       grid: tuple[int, int, int]) -> torch.Tensor:
        """Raster order, or in sparse (nabla) attention 8x8 tiles: token (t, h, w) sits at
        ((t * H/8 + h // 8) * W/8 + w // 8) * 64 + (h % 8) * 8 + w % 8."""
        if self.token_multiple(self.unwrap(transformer).config) == 1:
            return super().tokens_to_grid(transformer, tokens, grid)
        frames, height, width = grid
        batch, count, dim = tokens.shape
        if count != frames * height * width or height % TILE or width % TILE:
            raise ValueError(f"{self.name}: block output has {count} tokens, expected {frames}x{height}x{width} "
                             f"with sides divisible by {TILE} for sparse attention")
        tiles = tokens.reshape(batch, frames, height // TILE, width // TILE, TILE, TILE, dim)
        return tiles.permute(0, 1, 2, 4, 3, 5, 6).reshape(batch, frames, height, width, dim)

    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        """ComfyUI's Kandinsky 5 model (comfy/ldm/kandinsky5/model.py) names its layers as diffusers does, and its
        loader reads `diffusion_model.<layer>` for every weight: each layer keeps its name under that prefix."""
        return {name: f"diffusion_model.{name}" for name, _ in self.unwrap(transformer).named_modules()
                if re.fullmatch(_LINEAR_LAYERS, name)}

    def tiny_transformer_config(self) -> dict:
        return dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
                    patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=3,
                    axes_dims=(4, 2, 2), visual_cond=True)

    def tiny_transformer(self) -> nn.Module:
        transformer = super().tiny_transformer()
        randomise_modulation(transformer, std=0.3)
        return transformer

    def tiny_vae_config(self) -> dict:
        return dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)

    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        from transformers import Qwen2_5_VLConfig

        # the tiny tokenizer's last ids are <|endoftext|>, <|im_start|>, <|im_end|>, as Qwen's bos and eos
        text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                    bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                      fullatt_block_indexes=[0])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision)

    def tiny_text_components(self) -> dict[str, Any]:
        from transformers import CLIPTextConfig, CLIPTextModel

        from crepa.tiny_models import tiny_clip_tokenizer, tiny_qwen_tokenizer

        settings = self.text_settings()
        qwen = tiny_qwen_tokenizer(settings["prompt_template"], settings["prompt_template_encode_start_idx"])
        clip = tiny_clip_tokenizer()
        clip_config = CLIPTextConfig(vocab_size=len(clip), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=77,
                                     bos_token_id=clip.bos_token_id, eos_token_id=clip.eos_token_id,
                                     pad_token_id=clip.pad_token_id)
        qwen_encoder = self.text_encoder_class()(self.tiny_text_encoder_config(len(qwen))).eval()
        return {"tokenizer": qwen, "text_encoder": qwen_encoder, "tokenizer_2": clip,
                "text_encoder_2": CLIPTextModel(clip_config).eval()}


def randomise_modulation(transformer: nn.Module, std: float) -> None:
    """Draw every modulation layer's weight and bias from N(0, std).

    diffusers initialises them to zero, which makes every block the identity (its gates are zero): a random model
    would then ignore its text and time entirely.
    """
    for name, module in transformer.named_modules():
        if name.endswith("modulation"):
            nn.init.normal_(module.out_layer.weight, std=std)
            nn.init.normal_(module.out_layer.bias, std=std)


