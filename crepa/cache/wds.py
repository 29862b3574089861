"""WebDataset tar shards of cache samples, for streaming the cache to many nodes.

A sample is {"__key__": key, "latents.npy": array, "teacher.npy": array (optional), "text.npy": array,
"json": dict}; in the tar it becomes members `<key>.latents.npy`, `<key>.teacher.npy`, `<key>.text.npy`
and `<key>.json`, readable with plain `tar` and `webdataset.WebDataset`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator

import fsspec
import webdataset

from crepa.cache.atomic import atomic_open

REQUIRED_FIELDS = ("latents.npy", "text.npy", "json")


def _check_sample(sample: dict, seen: set[str]) -> str:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample without a __key__ (fields {sorted(sample)}); every sample needs its clip key")
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} contains '.' or '/', which would split its tar members; use the clip key")
    if key in seen:
        raise ValueError(f"sample key {key!r} appears twice; each clip is exported once")
    missing = [f for f in REQUIRED_FIELDS if f not in sample]
    if missing:
        raise ValueError(f"sample {key!r} lacks fields {missing}")
    return key


def export_webdataset(
    samples: Iterable[dict], out_dir: str, *, maxcount: int = 1000, maxsize: int = 2**30
) -> list[str]:
    """Write samples to shards `cache-000000.tar`, ... in `out_dir` (a path or fsspec URL); return their URLs.

    A shard holds at most `maxcount` samples and closes once it passes `maxsize` bytes. Each is written
    under a temporary name and renamed when complete, so a crash never leaves a truncated shard.
    """
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"maxcount={maxcount} and maxsize={maxsize} must be >= 1")
    fs, root = fsspec.core.url_to_fs(out_dir)
    prefix = out_dir.rstrip("/") if "://" in out_dir else root
    shards: list[str] = []
    seen: set[str] = set()
    samples = iter(samples)
    pending = next(samples, None)
    while pending is not None:
        name = f"cache-{len(shards):06d}.tar"
        with atomic_open(fs, posixpath.join(root, name)) as f, webdataset.TarWriter(f) as tar:
            count = size = 0
            while pending is not None and count < maxcount and size < maxsize:
                seen.add(_check_sample(pending, seen))
                size += tar.write(pending)
                count += 1
                pending = next(samples, None)
        shards.append(f"{prefix}/{name}")
    return shards


def iter_webdataset(urls: list[str]) -> Iterator[dict]:
    """Samples of the shards at `urls` (paths, file:// or any URL webdataset opens) with arrays and dicts decoded.

    Raises on the first bad sample instead of skipping it.
    """
    dataset = webdataset.WebDataset(
        urls, shardshuffle=False, empty_check=False, handler=webdataset.reraise_exception
    ).decode(handler=webdataset.reraise_exception)
    try:
        yield from dataset
    except webdataset.DecodingError as exc:  # its own message is empty; name the shard, sample and field
        raise ValueError(
            f"{exc.url}: field {exc.k!r} of sample {exc.key!r} cannot be decoded ({exc.__cause__!r}); "
            "re-export the shard with `crepa cache export`"
        ) from exc
