"""Resumable checkpoints: trainable weights, projector, optimizer, schedules, RNG and data position, plus the
weights in the format users load (the LoRA) so every checkpoint can be tried as it is."""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
from collections.abc import Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from crepa.errors import UserError
from train.experts import PRIMARY, component_file
from train.sharding import load_optimizer_state, load_trainable_state, optimizer_state, trainable_state

PROJECTOR_WEIGHTS = "crepa_projector.safetensors"
TRAINABLE_WEIGHTS = "trainable.safetensors"


def save_projector(projector: nn.Module, folder: str, component: str = PRIMARY) -> str:
    """The projector beside the LoRA, with its shape in the metadata; another component's carries its name."""
    path = os.path.join(folder, component_file(PROJECTOR_WEIGHTS, component))
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    save_file(state, path, metadata={"hidden_dim": str(projector.hidden_dim), "teacher_dim": str(projector.teacher_dim),
                                     "kind": projector.kind})
    return path


Trained = Mapping[str, tuple[nn.Module, nn.Module | None]]
"""Pipeline component (`transformer`, `transformer_2`) -> its trained model and CREPA projector (None without)."""


def save_checkpoint(folder: str, *, denoisers: Trained, optimizer, lr_scheduler, trainer_state: dict,
                    rank: int, export: Callable[[str], object] | None = None) -> None:
    """Written to a temporary folder and renamed, so a crash never leaves a half checkpoint.

    Each component's trainable weights and projector go to their own files (`trainable.safetensors`,
    `trainable_transformer_2.safetensors`, ...); one optimizer holds them all. `export(folder)` writes the usable
    weights (the LoRA files) into it on rank 0, inside that rename too. Every rank calls this: FSDP shards are
    gathered to rank 0, so the files are those of an unsharded run.
    """
    tmp = f"{folder}.tmp"
    weights = {component: trainable_state(model, keep=rank == 0) for component, (model, _) in denoisers.items()}
    optimizer_saved = optimizer_state(optimizer, keep=rank == 0)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for component, (_, projector) in denoisers.items():
            save_file(weights[component], os.path.join(tmp, component_file(TRAINABLE_WEIGHTS, component)))
            if projector is not None:
                save_projector(projector, tmp, component)
        if export is not None:
            export(tmp)
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


def load_checkpoint(folder: str, *, denoisers: Trained, optimizer, lr_scheduler, rank: int) -> dict:
    """Restore everything `save_checkpoint` wrote, each rank keeping its own FSDP shards; returns the trainer
    state. Checkpoints do not depend on the number of ranks or on FSDP."""
    _check_components(folder, denoisers)
    for component, (model, projector) in denoisers.items():
        _load_trainable(os.path.join(folder, component_file(TRAINABLE_WEIGHTS, component)), model)
        if projector is not None:
            projector_path = os.path.join(folder, component_file(PROJECTOR_WEIGHTS, component))
            if not os.path.exists(projector_path):
                raise UserError(f"checkpoint {folder} has no CREPA projector; resume with the CREPA options it used")
            projector.load_state_dict(_read(projector_path, load_file))
    saved = _read(os.path.join(folder, "optimizer.pt"), _load_tensors)
    load_optimizer_state(optimizer, saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    load_rng_state(folder, rank)
    return _read(os.path.join(folder, "trainer_state.json"), _load_json)


def _check_components(folder: str, denoisers: Trained) -> None:
    """The checkpoint trained the same pipeline components as this run (its optimizer holds exactly theirs)."""
    stem, ext = os.path.splitext(TRAINABLE_WEIGHTS)
    saved = sorted(PRIMARY if name == TRAINABLE_WEIGHTS else name[len(stem) + 1: -len(ext)]
                   for name in os.listdir(folder) if name.startswith(stem) and name.endswith(ext))
    if saved and saved != sorted(denoisers):
        raise UserError(f"checkpoint {folder} trained {', '.join(saved)} but this run trains "
                        f"{', '.join(sorted(denoisers))}", fix="resume with the --expert the checkpoint was made with")


def _load_trainable(path: str, model: nn.Module) -> None:
    state = _read(path, load_file)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in state]
    if missing:
        raise UserError(f"checkpoint {os.path.dirname(path)} does not match this model (missing {missing[0]} ...); "
                         "resume with the same --lora-* / --full options")
    load_trainable_state(model, state)


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
