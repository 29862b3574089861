"""Capture of one (or two) DiT blocks' outputs during the denoiser's own forward pass."""

from __future__ import annotations

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.base import FamilyAdapter


class BlockCapture:
    """Forward hooks that keep block outputs, reshaped to (B, F, hs, ws, D).

    Use as a context manager around the transformer's forward and read `student` / `teacher`
    inside it; a batch run as several forwards (one per group of clips) reads as the groups'
    outputs concatenated in the order the forwards ran. On exit (even when the forward raises)
    the hooks are removed and the kept outputs dropped. The student block keeps its autograd
    graph; the optional teacher block (backbone mode) is detached.
    """

    def __init__(
        self,
        adapter: FamilyAdapter,
        transformer: nn.Module,
        block_index: int,
        teacher_block_index: int | None = None,
    ):
        adapter.check_block_index(transformer, block_index, "crepa_block_index")
        if teacher_block_index is not None:
            adapter.check_block_index(transformer, teacher_block_index, "crepa_teacher_block_index")
            if teacher_block_index <= block_index:
                raise UserError(
                    f"crepa_teacher_block_index={teacher_block_index} must be deeper than "
                    f"crepa_block_index={block_index}"
                )
        self.adapter = adapter
        self.transformer = transformer
        self.block_index = block_index
        self.teacher_block_index = teacher_block_index
        self._outputs: dict[int, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def keep(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
            self._outputs.setdefault(index, []).append(self.adapter.block_tokens(output))

        return keep

    def __enter__(self) -> BlockCapture:
        blocks = self.adapter.blocks(self.transformer)
        self._outputs.clear()
        for index in (self.block_index, self.teacher_block_index):
            if index is not None:
                self._handles.append(blocks[index].register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()  # the kept outputs would otherwise pin this step's graph

    def _grid(self, index: int, latent_shape: torch.Size) -> torch.Tensor:
        if index not in self._outputs:
            raise RuntimeError(f"block {index} did not run inside the capture; call the transformer within it")
        grid = self.adapter.token_grid(self.transformer, latent_shape)
        outputs = self._outputs[index]
        tokens = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return self.adapter.tokens_to_grid(self.transformer, tokens, grid)

    def student(self, latent_shape: torch.Size) -> torch.Tensor:
        """(B, F, hs, ws, D) output of `block_index`, with gradients."""
        return self._grid(self.block_index, latent_shape)

    def teacher(self, latent_shape: torch.Size) -> torch.Tensor:
        """(B, F, hs, ws, D) detached output of `teacher_block_index` (backbone mode)."""
        if self.teacher_block_index is None:
            raise RuntimeError("no teacher block was requested; pass teacher_block_index")
        return self._grid(self.teacher_block_index, latent_shape).detach()
