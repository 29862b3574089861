"""Loading the family's VAE and text encoder for precompute, and running them on the device."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from crepa.families.base import FamilyAdapter, ImageEncoders, TextEncoders
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


def load_image_encoders(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device) -> ImageEncoders:
    """The pipeline's image encoder (on the device unless offloading) and its image processor."""
    import transformers

    dtype = compute_dtype(config.image_encoder_dtype, device)
    encoder = load_pretrained(getattr(transformers, adapter.image_encoder_class_name), config.model, "image_encoder",
                              dtype=dtype)
    return {"image_encoder": encoder.to("cpu" if config.offload else device).eval().requires_grad_(False),
            "image_processor": load_pretrained(transformers.AutoImageProcessor, config.model, "image_processor")}


def text_overrides(adapter: FamilyAdapter, config: PrecomputeConfig) -> dict[str, str | None]:
    """Every tokenizer and text-encoder subfolder of the family -> the folder that overrides `<model>/<subfolder>`.

    --tokenizer / --text-encoder override the first pair; a second pair always comes from the --model folder.
    """
    overrides: dict[str, str | None] = {}
    for subfolder in adapter.text_encoder_classes:
        first = subfolder == "text_encoder"
        overrides[adapter.tokenizer_subfolder(subfolder)] = config.tokenizer if first else None
        overrides[subfolder] = config.text_encoder if first else None
    return overrides


def load_text_encoders(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device) -> TextEncoders:
    """Every tokenizer and text encoder of the family by subfolder, encoders on the device unless offloading."""
    from transformers import AutoTokenizer

    dtype = compute_dtype(config.text_encoder_dtype, device)
    loaded: TextEncoders = {}
    for subfolder, override in text_overrides(adapter, config).items():
        if subfolder in adapter.text_encoder_classes:
            encoder = load_pretrained(adapter.text_encoder_class(subfolder), config.model, subfolder, override,
                                      dtype=dtype)
            loaded[subfolder] = encoder.to("cpu" if config.offload else device).eval().requires_grad_(False)
        else:
            loaded[subfolder] = load_pretrained(AutoTokenizer, config.model, subfolder, override)
    return loaded
