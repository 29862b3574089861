"""Resumable checkpoints: trainable weights, projector, optimizer, schedules, RNG and data position."""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROJECTOR_WEIGHTS = "crepa_projector.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_projector(projector: nn.Module, folder: str) -> str:
    """The projector beside the LoRA, with its shape in the metadata."""
    path = os.path.join(folder, PROJECTOR_WEIGHTS)
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    save_file(state, path, metadata={"hidden_dim": str(projector.hidden_dim), "teacher_dim": str(projector.teacher_dim),
                                     "kind": projector.kind})
    return path


def save_checkpoint(folder: str, *, model: nn.Module, projector: nn.Module | None, optimizer, lr_scheduler,
                    trainer_state: dict, rank: int, generator: torch.Generator) -> None:
    """Written to a temporary folder and renamed, so a crash never leaves a half checkpoint."""
    tmp = f"{folder}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
        if projector is not None:
            save_projector(projector, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=2)
    _barrier()
    torch.save({"torch": torch.get_rng_state(), "generator": generator.get_state()},
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _barrier()


def load_checkpoint(folder: str, *, model: nn.Module, projector: nn.Module | None, optimizer, lr_scheduler,
                    rank: int, generator: torch.Generator) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state."""
    state = load_file(os.path.join(folder, "trainable.safetensors"))
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in state]
    if missing:
        raise ValueError(f"checkpoint {folder} does not match this model (missing {missing[0]} ...); "
                         "resume with the same --lora-* / --full options")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    if projector is not None:
        projector_path = os.path.join(folder, PROJECTOR_WEIGHTS)
        if not os.path.exists(projector_path):
            raise ValueError(f"checkpoint {folder} has no CREPA projector; resume with the CREPA options it used")
        projector.load_state_dict(load_file(projector_path))
    saved = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    rng = torch.load(os.path.join(folder, f"rng_rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return json.load(f)


def find_checkpoint(output_dir: str, resume: str) -> str:
    """'latest' -> the newest checkpoint-N in output_dir; otherwise the given folder."""
    if resume != "latest":
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
        return resume
    found = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*[0-9]")),
                   key=lambda p: int(p.rsplit("-", 1)[1]))
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint-N folder in {output_dir}")
    return found[-1]


def prune_checkpoints(output_dir: str, keep: int | None) -> None:
    if not keep:
        return
    found = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*[0-9]")), key=lambda p: int(p.rsplit("-", 1)[1]))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
