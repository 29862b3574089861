"""The one interface every model family implements.

The trainer and precompute never test for a family by name: every family-specific fact
(block list, token layout, VAE normalisation, text encoding, flow-matching conventions)
lives behind these verbs, one module per family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class FamilyAdapter(ABC):
    """Model-family facts and verbs shared by precompute and train."""

    name: str
    """Short name used on the command line and stored in the cache."""
    transformer_class_name: str
    """diffusers class of the denoiser."""
    block_list_attr: str
    """Attribute of the transformer that holds its `nn.ModuleList` of blocks."""

    def transformer_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    @staticmethod
    def unwrap(transformer: nn.Module) -> nn.Module:
        """The diffusers model inside a DDP or torch.compile wrapper."""
        module = getattr(transformer, "module", transformer)
        return getattr(module, "_orig_mod", module)

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        """The transformer's block list."""
        return getattr(self.unwrap(transformer), self.block_list_attr)

    def check_block_index(self, transformer: nn.Module, index: int, option: str) -> None:
        """Fail before any forward when `index` names no block."""
        count = len(self.blocks(transformer))
        if not 0 <= index < count:
            raise ValueError(
                f"{option}={index} is out of range: the {self.name} transformer has {count} blocks, "
                f"valid indices are 0..{count - 1}"
            )

    @abstractmethod
    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        """(F, hs, ws) of the block tokens for latents of shape (B, C, F, H, W)."""

    def block_tokens(self, output: torch.Tensor | tuple) -> torch.Tensor:
        """The (B, N, D) video tokens inside a block's forward output."""
        return output[0] if isinstance(output, tuple) else output

    def tokens_to_grid(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, D) tokens in (t, h, w) raster order -> (B, F, hs, ws, D)."""
        frames, height, width = grid
        batch, count, dim = tokens.shape
        if count != frames * height * width:
            raise ValueError(
                f"{self.name}: block output has {count} tokens, expected {frames}x{height}x{width} from the latents"
            )
        return tokens.reshape(batch, frames, height, width, dim)

    @abstractmethod
    def tiny_transformer_config(self) -> dict:
        """Constructor kwargs of a few-thousand-parameter transformer for tests and the demo."""
