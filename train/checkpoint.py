"""Resumable checkpoints: trainable weights, projector, optimizer, schedules, RNG and data position, plus the
weights in the format users load (the LoRA) so every checkpoint can be tried as it is."""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from crepa.errors import UserError
from train.sharding import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

PROJECTOR_WEIGHTS = "crepa_projector.safetensors"


def save_projector(projector: nn.Module, folder: str) -> str:
    """The projector beside the LoRA, with its shape in the metadata."""
    path = os.path.join(folder, PROJECTOR_WEIGHTS)
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    save_file(state, path, metadata={"hidden_dim": str(projector.hidden_dim), "teacher_dim": str(projector.teacher_dim),
                                     "kind": projector.kind})
    return path


def save_checkpoint(folder: str, *, model: nn.Module, projector: nn.Module | None, optimizer, lr_scheduler,
                    trainer_state: dict, rank: int, export: Callable[[str], object] | None = None) -> None:
    """Written to a temporary folder and renamed, so a crash never leaves a half checkpoint.

    `export(folder)` writes the usable weights (the LoRA files) into it on rank 0, inside that rename too.
    Every rank calls it: FSDP shards are gathered to rank 0, so the files are those of an unsharded run.
    """
    tmp = f"{folder}.tmp"
    weights, optimizer_saved = trainable_state(model, keep=rank == 0), optimizer_state(optimizer, keep=rank == 0)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, "trainable.safetensors"))
        if export is not None:
            export(tmp)
        if projector is not None:
            save_projector(projector, tmp)
        torch.save({"optimizer": optimizer_saved, "lr_scheduler": lr_scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=2)
    _barrier()
    save_rng_state(tmp, rank)
    _barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _barrier()


def load_checkpoint(folder: str, *, model: nn.Module, projector: nn.Module | None, optimizer, lr_scheduler,
                    rank: int) -> dict:
    """Restore everything `save_checkpoint` wrote, each rank keeping its own FSDP shards; returns the trainer
    state. Checkpoints do not depend on the number of ranks or on FSDP."""
    state = _read(os.path.join(folder, "trainable.safetensors"), load_file)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in state]
    if missing:
        raise UserError(f"checkpoint {folder} does not match this model (missing {missing[0]} ...); "
                         "resume with the same --lora-* / --full options")
    load_trainable_state(model, state)
    if projector is not None:
        projector_path = os.path.join(folder, PROJECTOR_WEIGHTS)
        if not os.path.exists(projector_path):
            raise UserError(f"checkpoint {folder} has no CREPA projector; resume with the CREPA options it used")
        projector.load_state_dict(_read(projector_path, load_file))
    saved = _read(os.path.join(folder, "optimizer.pt"), _load_tensors)
    load_optimizer_state(optimizer, saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    load_rng_state(folder, rank)
    return _read(os.path.join(folder, "trainer_state.json"), _load_json)


def save_rng_state(folder: str, rank: int) -> None:
    """This rank's CPU and CUDA generators (LoRA dropout draws from them), as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(folder, f"rng_rank{rank}.pt"))


def load_rng_state(folder: str, rank: int) -> None:
    rng = _read(os.path.join(folder, f"rng_rank{rank}.pt"), _load_tensors)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _load_tensors(path: str):
    # weights_only: unpickling anything else could run code from whoever wrote the folder
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _read(path: str, load):
    """`load(path)`, with one clear error for a file that is missing, damaged or holds more than data."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint file {path} is missing; resume from another checkpoint-N folder")
    try:
        return load(path)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path} holds more than tensors and plain values, which this tool never writes; "
                         "refusing to load it (unpickling it could run code): resume from a checkpoint you trust"
                         ) from error
    except (RuntimeError, EOFError, OSError, SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({error}); resume from another checkpoint-N folder") from error


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
