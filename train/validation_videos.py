"""Validation latents -> mp4s and contact sheets, with the VAE alone: after training, never inside it.

Reads what `train.validation` wrote under `<run>/validation/step-N/` (`<i>.safetensors` + `<i>.json`) and writes
`<i>.mp4` beside each and `contact_sheet.png` per step (one row per prompt, up to SHEET_FRAMES frames across),
and logs each sheet to the run's tensorboard log (`<run>/logs`) at its step.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file

from crepa.errors import UserError
from crepa.families import get_family
from crepa.families.loading import load_pretrained
from precompute.models import compute_dtype, precompute_device
from precompute.synthetic import write_video
from train.validation import VALIDATION_DIR

SHEET_FRAMES = 8
"""Frames of each sample on a contact sheet, evenly spaced from the first to the last."""
SHEET_TAG = "validation/contact_sheet"


@dataclass
class DecodedStep:
    """What decoding one step's samples wrote."""

    step: int
    videos: list[str] = field(default_factory=list)
    contact_sheet: str = ""


def run_config(run_dir: str) -> dict:
    """The run's train_config.json: its family, model and logging."""
    path = os.path.join(run_dir, "train_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no train_config.json", fix="pass the --output-dir of a `crepa train` run")
    with open(path) as f:
        return json.load(f)


def step_folders(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every validation step of the run, by step."""
    root = os.path.join(run_dir, VALIDATION_DIR)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = re.fullmatch(r"step-(\d+)", name)
        if match:
            found.append((int(match.group(1)), os.path.join(root, name)))
    if not found:
        raise UserError(f"{run_dir} holds no validation samples ({root}/step-N/)",
                        fix="train with --validation-prompts FILE (and --validation-every N)")
    return sorted(found)


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3)."""
    scaled = (pixels.float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def contact_sheet(videos: list[np.ndarray], columns: int = SHEET_FRAMES) -> np.ndarray:
    """uint8 (rows x H, columns x W, 3): one row per video (F, H, W, 3), up to `columns` frames evenly spaced."""
    rows = []
    for frames in videos:
        picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
        rows.append(np.concatenate(list(frames[picks]), axis=1))  # (H, n x W, 3)
    width = max(row.shape[1] for row in rows)
    return np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows], axis=0)


def decode_validation(run_dir: str, model: str | None = None, vae: str | None = None, device: str = "auto",
                      dtype: str = "auto", fps: float = 16.0) -> list[DecodedStep]:
    """Decode every validation step of the run at `run_dir` with the VAE of its model (or `model` / `vae`)."""
    from PIL import Image

    config = run_config(run_dir)
    steps = step_folders(run_dir)
    adapter = get_family(config["family"])
    target = precompute_device(device)
    decoder = load_pretrained(adapter.vae_class(), model or config["model"], "vae", vae,
                              torch_dtype=compute_dtype(dtype, target)).to(target).eval()
    writer = None
    if config.get("report_to", "tensorboard") == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "logs"))
    done = []
    try:
        for step, folder in steps:
            decoded, videos = DecodedStep(step), []
            names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"\d+\.safetensors", n)),
                           key=lambda n: int(n.split(".")[0]))
            for name in names:
                latents = load_file(os.path.join(folder, name))["latents"]  # (C, f, h, w)
                with torch.no_grad():
                    pixels = adapter.decode_latents(decoder, latents[None].to(target))[0]  # (3, F, H, W)
                frames = to_frames(pixels)
                path = os.path.join(folder, name.replace(".safetensors", ".mp4"))
                write_video(path, frames, fps)
                videos.append(frames)
                decoded.videos.append(path)
            if videos:
                sheet = contact_sheet(videos)
                decoded.contact_sheet = os.path.join(folder, "contact_sheet.png")
                Image.fromarray(sheet).save(decoded.contact_sheet)
                if writer is not None:
                    writer.add_image(SHEET_TAG, sheet, step, dataformats="HWC")
            done.append(decoded)
    finally:
        if writer is not None:
            writer.close()
    return done
