"""`--blocks-to-swap N`: the frozen weights of the last N transformer blocks live in host memory.

Each swapped block's frozen parameters (base weights, biases, norms, modulation tables; fp8 weights when the base
is fp8) are kept in pinned host memory and copied to the compute device just before the block runs, on a side CUDA
stream that overlaps the copy with the previous block's compute (an event orders the two), in the forward pass and
again for the recompute in backward. On the device a swapped parameter otherwise holds an empty tensor, so at most
two swapped blocks are there at a time: the one computing and the next one arriving. The frozen weights never
change, so nothing is copied back. Trainable parameters (the LoRA of a swapped block) and buffers stay on the
device: the optimizer keeps stepping the same tensors, and their gradients are where they are.

Gradient checkpointing is switched on: a block's forward then saves nothing for backward (its recompute in
backward re-reads the weights), so a block's device copy can be dropped as soon as its forward returns. Freeing
during backward waits for the next block's recompute instead, since the reentrant variant runs a block's backward
after its recompute's forward hooks.

On a CPU the same hooks run, with the host tensors themselves as the "device" copy; an empty parameter would fail
loudly if a block ever ran without its weights.
"""

from __future__ import annotations

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.base import FamilyAdapter


class BlockSwap:
    """Hooks that keep blocks `swapped` of `blocks` on the host and stream them to `device` ahead of use."""

    def __init__(self, transformer: nn.Module, blocks: nn.ModuleList, swapped: list[int], device: torch.device):
        self.device = device
        self.order = sorted(swapped)
        self.host: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        self._empty: dict[torch.dtype, torch.Tensor] = {}
        pin = device.type == "cuda"
        for index in self.order:
            frozen = [p for p in blocks[index].parameters() if not p.requires_grad]
            self.host[index] = [(p, p.data.pin_memory() if pin else p.data) for p in frozen]
        self.loaded: dict[int, torch.cuda.Event | None] = {}
        """Swapped blocks whose weights are on the device, with the event their copy completes at (None: ready)."""
        for index in self.order:
            self._release(index)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.forward = False
        """True while the transformer's own forward runs; block calls after it are backward's recomputes."""
        transformer.register_forward_pre_hook(self._before_model)
        transformer.register_forward_hook(self._after_model)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(self._before_block(index))
            if index in self.host:
                block.register_forward_hook(self._after_block(index))

    def _next(self, index: int | None) -> int | None:
        """The swapped block the pass in progress meets after block `index` (None: the pass's first)."""
        if self.forward:
            later = [i for i in self.order if index is None or i > index]
            return later[0] if later else None
        earlier = [i for i in self.order if index is None or i < index]
        return earlier[-1] if earlier else None

    def _fetch(self, index: int) -> None:
        """Start copying block `index` to the device (asynchronously on CUDA)."""
        if index in self.loaded:
            return
        if self.stream is None:
            for param, host in self.host[index]:
                param.data = host.to(self.device)
            self.loaded[index] = None
            return
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for _, host in self.host[index]]
            event = torch.cuda.Event()
            event.record(self.stream)
        for (param, _), copy in zip(self.host[index], copies, strict=True):
            param.data = copy
        self.loaded[index] = event

    def _ready(self, index: int) -> None:
        """Block `index`'s weights are on the device and usable by the compute stream."""
        self._fetch(index)
        event = self.loaded[index]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for param, _ in self.host[index]:  # allocated on the side stream: freed only once compute is done
                param.data.record_stream(current)
            self.loaded[index] = None

    def _release(self, index: int) -> None:
        """Drop block `index`'s device copy; its host copy stays."""
        for param, _ in self.host[index]:
            if param.dtype not in self._empty:
                self._empty[param.dtype] = torch.empty(0, dtype=param.dtype, device=self.device)
            param.data = self._empty[param.dtype]
        self.loaded.pop(index, None)

    def _keep_only(self, *indices: int | None) -> None:
        for index in [i for i in self.loaded if i not in indices]:
            self._release(index)

    def _before_model(self, _module: nn.Module, _args: tuple) -> None:
        self.forward = True
        first = self._next(None)
        self._keep_only(first)
        if first is not None:
            self._fetch(first)

    def _after_model(self, _module: nn.Module, _args: tuple, _output: object) -> None:
        self.forward = False
        first = self._next(None)  # backward's first swapped block: the deepest
        if torch.is_grad_enabled() and first is not None:
            self._fetch(first)

    def _before_block(self, index: int):
        def hook(_module: nn.Module, _args: tuple) -> None:
            following = self._next(index)
            self._keep_only(index if index in self.host else None, following)
            if index in self.host:
                self._ready(index)
            if following is not None:
                self._fetch(following)

        return hook

    def _after_block(self, index: int):
        def hook(_module: nn.Module, _args: tuple, _output: object) -> None:
            if self.forward:  # checkpointed (or no grad): nothing of this block is saved for backward
                self._release(index)

        return hook


def swap_blocks(adapter: FamilyAdapter, transformer: nn.Module, count: int, device: torch.device) -> BlockSwap:
    """Keep the last `count` blocks' frozen weights on the host, streamed to `device`; call before the model moves
    to the device, after the base is in its storage dtype and LoRA is added."""
    model = adapter.unwrap(transformer)
    blocks = adapter.blocks(model)
    if not 1 <= count <= len(blocks):
        raise UserError(f"--blocks-to-swap {count} is out of range: the {adapter.name} transformer has {len(blocks)} "
                        f"blocks", fix=f"swap 1..{len(blocks)} blocks, or 0 for none")
    if not model.is_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return BlockSwap(model, blocks, list(range(len(blocks) - count, len(blocks))), device)
