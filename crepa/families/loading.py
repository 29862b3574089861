"""`from_pretrained` for pipeline components, with one clear error when a component cannot be found."""

from __future__ import annotations

import os
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype from its short or long name, e.g. 'bf16' or 'bfloat16'."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


def component_location(model: str | None, subfolder: str, override: str | None) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of one component: an explicit override wins over `<model>/<subfolder>`."""
    if override:
        return override, None
    if not model:
        raise ValueError(
            f"no location for the {subfolder}: pass --model (a pipeline folder or hub id) or --{subfolder}"
        )
    return model, subfolder


def load_pretrained(loader: Any, model: str | None, subfolder: str, override: str | None = None, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on a pipeline component, offline-friendly.

    A hub id works when it is already in the local Hugging Face cache; otherwise the error says
    which component was looked for where, and how to point at a local folder instead.
    """
    path, sub = component_location(model, subfolder, override)
    if sub is not None:
        kwargs["subfolder"] = sub
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        where = os.path.join(path, sub) if sub else path
        raise OSError(
            f"could not load the {subfolder} from {where!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Pass a local pipeline folder with --model, or the component's own folder with --{subfolder}; "
            "hub ids only work when already downloaded to the Hugging Face cache."
        ) from error


def load_config(loader: Any, model: str | None, subfolder: str, override: str | None = None) -> dict:
    """A component's config without its weights (diffusers `load_config`)."""
    path, sub = component_location(model, subfolder, override)
    try:
        return dict(loader.load_config(path, subfolder=sub) if sub else loader.load_config(path))
    except (OSError, ValueError) as error:
        where = os.path.join(path, sub) if sub else path
        raise OSError(
            f"could not read the {subfolder} config from {where!r}: {str(error).splitlines()[0]}. "
            f"Pass a local pipeline folder with --model, or the component's own folder with --{subfolder}."
        ) from error


def component_identity(model: str | None, subfolder: str, override: str | None = None) -> dict:
    """What names a component in cache fingerprints, without loading it.

    For a local folder: its absolute path and every file's name, size and mtime, so re-saved
    weights give a new identity. For a hub id: the id and subfolder.
    """
    path, sub = component_location(model, subfolder, override)
    folder = os.path.join(path, sub) if sub else path
    if not os.path.isdir(folder):
        return {"hub_id": path, "subfolder": sub}
    files = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            stat = os.stat(os.path.join(root, name))
            files.append([os.path.relpath(os.path.join(root, name), folder), stat.st_size, stat.st_mtime_ns])
    return {"path": os.path.abspath(folder), "files": sorted(files)}
