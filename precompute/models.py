"""Loading the family's VAE and text encoder for precompute, and running them on the device."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from crepa.families.base import FamilyAdapter
from crepa.families.loading import load_pretrained, resolve_dtype
from precompute.config import PrecomputeConfig


def precompute_device(name: str) -> torch.device:
    """`auto` picks cuda:LOCAL_RANK when a GPU is there, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on the CPU (CPU bf16 convolutions are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolve_dtype(name)


class Timer:
    """Seconds per named step (model forwards: the numerator of the pipeline's efficiency; model loading).

    On a GPU kernels run asynchronously, so the device is synchronised on entry (work queued before is not
    this step's) and on exit (this step's kernels have finished): the seconds are the step's own.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, device: torch.device) -> Iterator[None]:
        _synchronize(device)
        start = time.perf_counter()
        yield
        _synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def resident(model: nn.Module, device: torch.device, offload: bool) -> Iterator[nn.Module]:
    """The model on `device` for the duration; with offload it goes back to the CPU afterwards."""
    if offload:
        model.to(device)
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")


def load_vae(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device) -> nn.Module:
    dtype = compute_dtype(config.vae_dtype, device)
    vae = load_pretrained(adapter.vae_class(), config.model, "vae", config.vae, torch_dtype=dtype)
    if config.vae_tiling:
        vae.enable_tiling()
    if config.vae_slicing:
        vae.enable_slicing()
    return vae.to("cpu" if config.offload else device).eval().requires_grad_(False)


def load_text_encoder(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device):
    """(tokenizer, text encoder) of the family, on the device unless offloading."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, config.model, "tokenizer", config.tokenizer)
    dtype = compute_dtype(config.text_encoder_dtype, device)
    encoder = load_pretrained(adapter.text_encoder_class(), config.model, "text_encoder", config.text_encoder,
                              dtype=dtype)
    return tokenizer, encoder.to("cpu" if config.offload else device).eval().requires_grad_(False)
