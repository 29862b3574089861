"""The --out folder: refused before anything is written when it cannot hold a cache, and a full disk named."""

from __future__ import annotations

import errno
import uuid

import fsspec

from crepa.cache.store import CacheStore
from crepa.errors import UserError


def open_output(out: str, dry_run: bool = False) -> CacheStore:
    """The cache at `out`, created when `out` is missing or empty; anything else there is left untouched.

    A dry run creates nothing: it reads an existing cache, and plans a new one in an in-memory store.
    """
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    exists = fs.exists(f"{root}/zarr.json")
    if fs.exists(root) and not exists:
        if not fs.isdir(root):
            raise UserError(f"--out {out} is a file", fix="point --out at a new or empty folder, or at a cache")
        if fs.ls(root, detail=False):
            raise UserError(f"--out {out} is not empty and is not a crepa cache",
                            fix="point --out at a new or empty folder, or at a cache made by `crepa precompute`")
    if dry_run:  # read only: planning changes nothing, in an existing cache or a new one
        return CacheStore.open(out if exists else f"memory://crepa-dry-run/{uuid.uuid4().hex}",
                               mode="r" if exists else "a")
    try:
        return CacheStore.open(out, mode="a")
    except PermissionError as error:
        raise UserError(f"--out {out} is not writable ({error.strerror}: {error.filename})",
                        fix="fix its permissions or point --out elsewhere") from None


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


def disk_full(out: str, still_to_write: int) -> UserError:
    """The error for a write that ran out of space, saying where and about how much more is needed."""
    from precompute.report import human_bytes  # here: the report module imports the pipeline, which imports this

    return UserError(
        f"disk full writing the cache {out}: about {human_bytes(still_to_write)} still to write (uncompressed "
        "latents and teacher features)",
        fix="free that much space there, or point --out at a bigger disk, then rerun: committed clips are kept",
    )
