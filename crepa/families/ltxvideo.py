"""LTX-Video 0.9.x text-to-video (LTXVideoTransformer3DModel, AutoencoderKLLTXVideo, T5).

What sets LTX-Video apart: the transformer takes packed (B, F*H*W, C) latents and returns its prediction packed the
same way (patch 1 x 1 x 1, the pipeline's `_pack_latents` / `_unpack_latents`); its rotary positions are scaled by
the VAE's compression and the clip's frame rate; T5 encodes the padded caption without the mask, which the
transformer gets instead; and the scheduler shifts sigmas by the token count, then stretches them to end at
`shift_terminal`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.base import Conditioning, FamilyAdapter, TextEncoders, comfyui_names

SCHEDULER_CONFIG = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                        max_image_seq_len=4096, shift_terminal=0.1)
"""The FlowMatchEulerDiscreteScheduler settings of Lightricks/LTX-Video's scheduler/scheduler_config.json."""

DEFAULT_FRAME_RATE = 25.0
"""LTXPipeline's `frame_rate` default, for clips whose cache recorded no fps."""

DECODE_TIMESTEP = 0.0
"""LTXPipeline's `decode_timestep` default: the timestep a timestep-conditioned VAE (0.9.1+) decodes at, with
`decode_noise_scale` equal to it, so no noise is mixed in."""

# diffusers module (a full-name pattern) -> the module of ComfyUI's native LTXV model (comfy/ldm/lightricks/model.py).
# Every Linear a LoRA can wrap; ComfyUI names the input projection `patchify_proj` and the timestep embedding
# `adaln_single`, the rest as diffusers does. Norms and the modulation tables are no LoRA targets.
_COMFYUI_MODULES = (
    (r"proj_in", r"patchify_proj"),
    (r"time_embed\.emb\.timestep_embedder\.(linear_[12])", r"adaln_single.emb.timestep_embedder.\1"),
    (r"time_embed\.linear", r"adaln_single.linear"),
    (r"caption_projection\.(linear_[12])", r"caption_projection.\1"),
    (r"transformer_blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)", r"transformer_blocks.\1.\2.\3"),
    (r"transformer_blocks\.(\d+)\.ff\.(net\.0\.proj|net\.2)", r"transformer_blocks.\1.ff.\2"),
    (r"proj_out", r"proj_out"),
)


def _pipeline():
    from diffusers import LTXPipeline

    return LTXPipeline


def _latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(1, C, 1, 1, 1) mean and std buffers of the VAE, and its scaling factor: what the pipeline normalises with."""
    shape = (1, -1, 1, 1, 1)
    mean = vae.latents_mean.view(shape).to(like.device, like.dtype)
    std = vae.latents_std.view(shape).to(like.device, like.dtype)
    return mean, std, vae.config.scaling_factor


def dynamic_shift(scheduler_config: dict, tokens: int) -> float:
    """The static-shift equivalent of the scheduler's token-count shift.

    LTXPipeline passes mu = calculate_shift(tokens, ...) to the scheduler, which maps sigma to
    e^mu / (e^mu + 1/sigma - 1) ("exponential") or mu / (mu + 1/sigma - 1) ("linear"): the static shift s*sigma /
    (1 + (s-1)*sigma) with s = e^mu or mu. Defaults are the pipeline's own for keys the config lacks.
    """
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    mu = calculate_shift(tokens, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    return mu if scheduler_config.get("time_shift_type") == "linear" else math.exp(mu)


class LTXVideoAdapter(FamilyAdapter):
    name = "ltxvideo"
    transformer_class_name = "LTXVideoTransformer3DModel"
    block_list_attr = "transformer_blocks"
    vae_class_name = "AutoencoderKLLTXVideo"
    text_encoder_classes = {"text_encoder": "T5EncoderModel"}
    pipeline_class_name = "LTXPipeline"
    default_text_max_length = 128
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_crepa_block = 8
    latents_normalisation = "(z - latents_mean) * scaling_factor / latents_std, as LTXPipeline"

    def default_scheduler_config(self) -> dict:
        return dict(SCHEDULER_CONFIG)

    def vae_compression(self, vae_config: dict) -> tuple[int, int]:
        # as AutoencoderKLLTXVideo.__init__: 0.9.5+ configs state both ratios, older ones derive them
        scaling = 2 ** sum(vae_config["spatio_temporal_scaling"])
        spatial = vae_config.get("spatial_compression_ratio") or vae_config["patch_size"] * scaling
        temporal = vae_config.get("temporal_compression_ratio") or vae_config["patch_size_t"] * scaling
        return int(temporal), int(spatial)

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = distribution.sample(generator) if sample else distribution.mode()
        mean, std, scale = _latent_stats(vae, latents)
        return (latents - mean) * scale / std

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        mean, std, scale = _latent_stats(vae, latents)
        latents = (latents * std / scale + mean).to(vae.dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.full((latents.shape[0],), DECODE_TIMESTEP, device=latents.device, dtype=latents.dtype)
        return vae.decode(latents, timestep, return_dict=False)[0]

    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        text_encoder = encoders["text_encoder"]
        tokens = encoders["tokenizer"](captions, padding="max_length", max_length=max_length, truncation=True,
                                       add_special_tokens=True, return_tensors="pt")
        device = next(text_encoder.parameters()).device
        # the pipeline encodes the padded tokens without a mask (padding changes every token's embedding), and
        # masks the padding in the transformer instead: the caption's own tokens are what the transformer sees
        hidden = text_encoder(tokens.input_ids.to(device))[0]
        lengths = tokens.attention_mask.gt(0).sum(dim=1)
        return [{"embeds": h[:n]} for h, n in zip(hidden, lengths.tolist(), strict=True)]

    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        if conditioning.vae_compression is None:
            raise UserError("the ltxvideo transformer scales its positions by the VAE's compression, and none was "
                            "given", fix="pass --model a pipeline folder that holds vae/config.json")
        temporal, spatial = conditioning.vae_compression
        batch, _, frames, height, width = noisy_latents.shape
        fps = conditioning.fps
        fps = torch.full((batch,), DEFAULT_FRAME_RATE) if fps is None else fps.float().nan_to_num(DEFAULT_FRAME_RATE)
        # one temporal scale per clip, (B, 1, 1, 1, 1) to broadcast over the rope's (B, 1, F, H, W) frame coordinates:
        # clips of different frame rates share a batch
        temporal_scale = (temporal / fps).to(noisy_latents.device).view(batch, 1, 1, 1, 1)
        return dict(hidden_states=_pipeline()._pack_latents(noisy_latents), encoder_hidden_states=conditioning.text,
                    timestep=timesteps, encoder_attention_mask=conditioning.text_mask, num_frames=frames,
                    height=height, width=width, rope_interpolation_scale=(temporal_scale, spatial, spatial),
                    return_dict=False)

    def prediction(self, output: Any, latent_shape: torch.Size) -> torch.Tensor:
        packed = output[0] if isinstance(output, tuple) else output  # (B, F*H*W, C)
        batch, channels, frames, height, width = latent_shape
        if packed.shape != (batch, frames * height * width, channels):
            raise ValueError(f"{self.name}: the transformer's prediction has shape {tuple(packed.shape)}, expected "
                             f"({batch}, {frames * height * width}, {channels}) packed from the latents' "
                             f"{tuple(latent_shape)}")
        return _pipeline()._unpack_latents(packed, frames, height, width)

    def flow_shift(self, scheduler_config: dict, latent_shape: torch.Size) -> float:
        """The pipeline's token-count shift: it counts latent frames x height x width."""
        scheduler_config = scheduler_config or self.default_scheduler_config()
        if not scheduler_config.get("use_dynamic_shifting"):
            return super().flow_shift(scheduler_config, latent_shape)
        return dynamic_shift(scheduler_config, math.prod(latent_shape[2:]))

    def text_embedding_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.caption_channels

    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        config = self.unwrap(transformer).config
        _, _, frames, height, width = latent_shape
        return frames // config.patch_size_t, height // config.patch_size, width // config.patch_size

    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        return comfyui_names(self.unwrap(transformer), _COMFYUI_MODULES)

    def tiny_transformer_config(self) -> dict:
        return dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=12)

    def tiny_vae_config(self) -> dict:
        # 0.9.1's layout: a timestep-conditioned decoder; scaling factor and latent statistics (buffers, set in
        # tiny_vae) away from 1 and 0, so a missed normalisation step shows
        return dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                    spatio_temporal_scaling=(True, True, True, False),
                    decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=4, patch_size_t=1,
                    timestep_conditioning=True, scaling_factor=0.7)

    def tiny_vae(self) -> nn.Module:
        vae = super().tiny_vae()
        channels = vae.config.latent_channels
        vae.latents_mean.copy_(torch.linspace(-0.3, 0.4, channels))
        vae.latents_std.copy_(torch.linspace(0.6, 1.5, channels))
        return vae

    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        from transformers import T5Config

        return T5Config(vocab_size=vocab_size, d_model=12, d_kv=6, d_ff=24, num_layers=2, num_heads=2,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
