"""Content keys: a cache entry's name is a hash of everything that determines it, so changed inputs never hit."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec


def fingerprint(obj: Any, length: int = 16) -> str:
    """First `length` hex chars of sha256 over canonical JSON (sorted keys, no spaces), stable across runs."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_identity(url: str) -> dict:
    """{"path", "size", "mtime"} of a local path or fsspec URL: a rewritten file gets a new identity."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"source file {url} does not exist; check the path in the clip list") from None
    mtime = info.get("mtime", info.get("LastModified", info.get("updated", info.get("created"))))
    if mtime is not None and not isinstance(mtime, (int, float)):
        mtime = str(mtime)  # object stores report datetimes
    return {"path": fs.unstrip_protocol(path) if "://" in url else path, "size": int(info["size"]), "mtime": mtime}


def bytes_identity(data: bytes, name: str) -> dict:
    """Identity of an in-memory video (a dataset row) by its content, since it has no path or mtime."""
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest()}


def clip_key(source: dict, segment: dict, bucket: dict) -> str:
    """Key of one clip: source identity + segment (start, frames, fps) + bucket resolution and crop."""
    return fingerprint({"source": source, "segment": segment, "bucket": bucket})


def text_key(caption: str, text_encoder: dict, max_length: int) -> str:
    """Key of one caption embedding: caption text + text encoder identity + max token length."""
    return fingerprint({"caption": caption, "text_encoder": text_encoder, "max_length": max_length})
