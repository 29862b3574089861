"""`from_pretrained` for pipeline components, with one clear error when a component cannot be found.

A hub id found in the local Hugging Face cache is loaded from the snapshot its `refs/main` points to, and that
snapshot's revision is part of the component's identity: the weights computed with and the fingerprint they are
stored under always name the same revision, and a re-downloaded (updated) model gets a new fingerprint.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from crepa.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype from its short or long name, e.g. 'bf16' or 'bfloat16'."""
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


def component_location(model: str | None, subfolder: str, override: str | None) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of one component: an explicit override wins over `<model>/<subfolder>`."""
    if override:
        return override, None
    if not model:
        raise UserError(
            f"no location for the {subfolder}: pass --model (a pipeline folder or hub id) or --{subfolder}"
        )
    return model, subfolder


def hub_snapshot(repo_id: str) -> tuple[str, str] | None:
    """(revision, snapshot folder) that the local hub cache resolves `repo_id`'s main branch to; None if not cached.

    The cache is $HF_HUB_CACHE when set (read now, not at import), else huggingface_hub's default.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    folder = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    try:
        with open(os.path.join(folder, "refs", "main"), encoding="utf-8") as ref:
            revision = ref.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    snapshot = os.path.join(folder, "snapshots", revision)
    return (revision, snapshot) if revision and os.path.isdir(snapshot) else None


def _local(path: str) -> str:
    """`path` itself when it is a folder, else the cached snapshot of that hub id, else the hub id unchanged."""
    if os.path.isdir(path):
        return path
    cached = hub_snapshot(path)
    return cached[1] if cached else path


def load_pretrained(loader: Any, model: str | None, subfolder: str, override: str | None = None, **kwargs: Any) -> Any:
    """`loader.from_pretrained` on a pipeline component, offline-friendly.

    A hub id works when it is already in the local Hugging Face cache; otherwise the error says
    which component was looked for where, and how to point at a local folder instead.
    """
    path, sub = component_location(model, subfolder, override)
    if sub is not None:
        kwargs["subfolder"] = sub
    try:
        return loader.from_pretrained(_local(path), **kwargs)
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
        local = _local(path)
        return dict(loader.load_config(local, subfolder=sub) if sub else loader.load_config(local))
    except (OSError, ValueError) as error:
        where = os.path.join(path, sub) if sub else path
        raise OSError(
            f"could not read the {subfolder} config from {where!r}: {str(error).splitlines()[0]}. "
            f"Pass a local pipeline folder with --model, or the component's own folder with --{subfolder}."
        ) from error


def config_file(model: str | None, subfolder: str, name: str) -> str | None:
    """`<model>/<subfolder>/<name>` in a local folder or the cached snapshot of a hub id; None when there is none."""
    if not model:
        return None
    try:
        folder = _local(model)
    except ValueError:  # neither a folder nor a valid hub id: nothing to read, and loading the weights says so
        return None
    path = os.path.join(folder, subfolder, name)
    return path if os.path.isfile(path) else None


def component_identity(model: str | None, subfolder: str, override: str | None = None) -> dict:
    """What names a component in cache fingerprints, without loading it.

    For a local folder: its absolute path and every file's name, size and mtime, so re-saved
    weights give a new identity. For a hub id: the id, subfolder and the revision of its snapshot in the
    local hub cache. A hub id not in that cache has revision None: it is downloaded at load time, and the next
    run finds its revision and keys the component by it, so what was computed unpinned is recomputed, not reused.
    """
    path, sub = component_location(model, subfolder, override)
    folder = os.path.join(path, sub) if sub else path
    if not os.path.isdir(folder):
        cached = hub_snapshot(path)
        return {"hub_id": path, "subfolder": sub, "revision": cached[0] if cached else None}
    files = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            stat = os.stat(os.path.join(root, name))
            files.append([os.path.relpath(os.path.join(root, name), folder), stat.st_size, stat.st_mtime_ns])
    return {"path": os.path.abspath(folder), "files": sorted(files)}
