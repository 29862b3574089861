"""All-or-nothing writes on any fsspec filesystem, so a reader or a crash never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
from collections.abc import Iterator
from typing import IO, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


def is_local(fs: AbstractFileSystem) -> bool:
    """Local disks need temp file + fsync + rename; object stores make every single put atomic."""
    return isinstance(fs, LocalFileSystem)


def _temp_name(path: str) -> str:
    # Hidden, same directory (rename stays on one filesystem), never ends in a name readers glob for.
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.{secrets.token_hex(4)}.partial")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(fs: AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open `path` for binary writing under a temporary name; it appears under `path` only on success."""
    tmp = _temp_name(path)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        if is_local(fs):
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(posixpath.dirname(path))
        else:
            with fs.open(tmp, "wb") as f:
                yield f
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(tmp)
        raise


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    """Atomically write `obj` as JSON: temp + fsync + os.replace locally, one `pipe_file` put elsewhere."""
    data = json.dumps(obj, sort_keys=True, indent=1).encode()
    if is_local(fs):
        with atomic_open(fs, path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


def list_json(fs: AbstractFileSystem, folder: str) -> list[str]:
    """Paths of the committed `*.json` files directly in `folder` (temporary files excluded); [] when missing."""
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith("."))


def read_json_files(fs: AbstractFileSystem, paths: list[str]) -> dict[str, Any]:
    """Read many JSON files in one batched call (concurrent on object stores)."""
    if not paths:
        return {}
    return {path: json.loads(data) for path, data in fs.cat(paths).items()}


def fsync_tree(path: str) -> None:
    """Flush every file under a local folder to disk, so a commit never names data a power cut could lose."""
    for folder, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)
