"""Wan 2.1 / 2.2 text-to-video (WanTransformer3DModel, AutoencoderKLWan, UMT5)."""

from __future__ import annotations

import torch
from torch import nn

from crepa.families.base import FamilyAdapter


class WanAdapter(FamilyAdapter):
    name = "wan"
    transformer_class_name = "WanTransformer3DModel"
    block_list_attr = "blocks"

    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        p_t, p_h, p_w = self.unwrap(transformer).config.patch_size
        _, _, frames, height, width = latent_shape
        return frames // p_t, height // p_h, width // p_w

    def tiny_transformer_config(self) -> dict:
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
        )
