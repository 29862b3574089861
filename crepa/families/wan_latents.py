"""The latent space of Wan's VAE, shared by the families whose DiT denoises it (wan, sanavideo at 480p).

Both pipelines normalise `AutoencoderKLWan` latents with the VAE config's `latents_mean` / `latents_std`, and both
transformers patchify them with a Conv3d of `config.patch_size` (t, h, w) into tokens in (t, h, w) raster order.
"""

from __future__ import annotations

import torch
from torch import nn


def _latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1, 1) mean and std the pipelines normalise latents with."""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


class WanLatents:
    """Adapter verbs for Wan-VAE latents and a Conv3d-patchifying DiT; mixed into a `FamilyAdapter`."""

    vae_class_name = "AutoencoderKLWan"

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

    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.unwrap(transformer).config.patch_size
        _, _, frames, height, width = latent_shape
        return frames // p_t, height // p_h, width // p_w

    def tiny_vae_config(self) -> dict:
        return dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                    latents_std=[1.5, 0.8, 1.0, 1.2])
