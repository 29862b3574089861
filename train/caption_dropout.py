"""Caption dropout: some clips train on the empty prompt, so the model learns the unconditional prediction that
classifier-free guidance subtracts at sampling time (pipelines encode `negative_prompt=""` for it)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from crepa.families import Conditioning


def dropped_captions(keys: list[str], seed: int, step: int, rate: float) -> list[bool]:
    """Whether each clip's caption is dropped at `step`: a uniform draw from (seed, step, clip key) below `rate`.

    Like the noise (train.flow_matching.clip_generator) it does not depend on the rank, batch or micro-step a clip
    lands in, so a resumed or multi-process run drops what a single uninterrupted one drops. Its own hash stream
    leaves the noise and timestep draws as they are without dropout.
    """
    draws = []
    for key in keys:
        digest = hashlib.sha256(f"caption-dropout/{seed}/{step}/{key}".encode()).digest()
        draws.append(int.from_bytes(digest[:8], "little") / 2**64 < rate)
    return draws


def drop_captions(conditioning: Conditioning, empty: Conditioning, dropped: list[bool]) -> Conditioning:
    """`conditioning` (B clips) with the text of the `dropped` ones replaced by `empty` (one prompt): embeddings,
    mask and pooled vector alike; the frame rate stays the clip's."""
    rows = torch.tensor(dropped, device=conditioning.text.device)
    if not rows.any():
        return conditioning

    def swap(clip: torch.Tensor | None, blank: torch.Tensor | None) -> torch.Tensor | None:
        if clip is None:
            return None
        where = rows.view(-1, *([1] * (clip.ndim - 1)))  # (B, 1, ...)
        return torch.where(where, blank.to(clip.device, clip.dtype), clip)

    return replace(conditioning, text=swap(conditioning.text, empty.text),
                   text_mask=swap(conditioning.text_mask, empty.text_mask),
                   text_pooled=swap(conditioning.text_pooled, empty.text_pooled))
