"""WebDataset tar shards of cache samples and their index, for streaming the cache to many nodes.

A sample is {"__key__": key, "latents.npy": array, "teacher.npy": array (optional), "text.npy": array,
"json": dict}, plus "condition.npy" and/or "image_embeds.npy" for image-to-video caches; in the tar it becomes
members `<key>.latents.npy`, `<key>.teacher.npy`, `<key>.text.npy`, ... and `<key>.json`, readable with plain
`tar` and `webdataset.WebDataset`. The text of prompts that belong to no clip (the empty prompt, validation prompts)
goes to `prompts.tar` in the same format, keyed by text key.

Beside the shards, `shards.json` is a wids shard index (`wids-shard-index-v1`: shard URLs relative to the
index, with their sample counts), so a reader knows the epoch length without opening any shard. It also
records how many samples each shard holds once every clip's own num_repeats is applied, and under "crepa"
what the shards were made for (family, feature sets, teacher encoder).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import urlparse

import braceexpand
import fsspec
import webdataset
from webdataset import tariterators
from webdataset.gopen import gopen, gopen_schemes

from crepa.cache.atomic import atomic_open, write_json
from crepa.errors import UserError

REQUIRED_FIELDS = ("latents.npy", "text.npy", "json")
INDEX_NAME = "shards.json"
INDEX_KIND = "wids-shard-index-v1"
SHARD_PREFIX = "cache-"
PROMPTS_NAME = "prompts.tar"
"""Beside the shards: the text of the prompts that are no clip's caption (the empty prompt, validation prompts),
one sample per prompt (`<text key>.text.npy`, `<text key>.json` with the caption); no training sample."""
META_KEYS = ("family", "latents_set", "text_set", "text_max_length", "condition_set", "teacher_set", "encoder",
             "encoder_path", "vae_compression", "prompts")
"""What an exported sample's json says the shards were made for; its index records the same under "crepa"."""
CONDITION_ARRAYS = ("condition", "image_embeds")
"""Arrays of a condition set (image-to-video first-frame conditioning), each a `<name>.npy` member where present."""


def _check_sample(sample: dict, seen: set[str]) -> str:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise UserError(f"sample without a __key__ (fields {sorted(sample)}); every sample needs its clip key")
    if "." in key or "/" in key:
        raise UserError(f"sample key {key!r} contains '.' or '/', which would split its tar members; use the clip key")
    if key in seen:
        raise UserError(f"sample key {key!r} appears twice; each clip is exported once")
    missing = [f for f in REQUIRED_FIELDS if f not in sample]
    if missing:
        raise UserError(f"sample {key!r} lacks fields {missing}")
    return key


def _old_files(fs: fsspec.AbstractFileSystem, root: str, out_dir: str, overwrite: bool) -> list[str]:
    """Names of an earlier export in `root`; a folder holding anything without `overwrite` is refused."""
    try:
        names = [posixpath.basename(p) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    if names and not overwrite:
        raise UserError(f"{out_dir} is not empty; export into a new folder, or pass --overwrite to replace the "
                         "shards there")
    return [n for n in names if n in (INDEX_NAME, PROMPTS_NAME) or (n.startswith(SHARD_PREFIX) and n.endswith(".tar"))]


def export_webdataset(
    samples: Iterable[dict], out_dir: str, *, maxcount: int = 1000, maxsize: int = 2**30,
    meta: dict | None = None, overwrite: bool = False, prompts: list[dict] | None = None,
) -> list[str]:
    """Write samples to shards `cache-000000.tar`, ..., `prompts` (samples with a text, no clip) to `prompts.tar`
    when there are any, and `shards.json` in `out_dir` (a path or fsspec URL).

    A shard holds at most `maxcount` samples and closes once it passes `maxsize` bytes. Each is written
    under a temporary name and renamed when complete, so a crash never leaves a truncated shard. With
    `overwrite`, the old index goes first (a crash leaves no index, never one over a mix of shards) and the old
    shards the new export did not rewrite go last. Returns the shards' URLs.
    """
    if maxcount < 1 or maxsize < 1:
        raise UserError(f"maxcount={maxcount} and maxsize={maxsize} must be >= 1")
    fs, root = fsspec.core.url_to_fs(out_dir)
    old = _old_files(fs, root, out_dir, overwrite)
    if INDEX_NAME in old:
        fs.rm_file(posixpath.join(root, INDEX_NAME))
    prefix = out_dir.rstrip("/") if "://" in out_dir else root
    entries: list[dict] = []
    seen: set[str] = set()
    samples = iter(samples)
    pending = next(samples, None)
    while pending is not None:
        name = f"{SHARD_PREFIX}{len(entries):06d}.tar"
        with atomic_open(fs, posixpath.join(root, name)) as f, webdataset.TarWriter(f) as tar:
            count = size = repeated = 0
            while pending is not None and count < maxcount and size < maxsize:
                seen.add(_check_sample(pending, seen))
                size += tar.write(pending)
                count += 1
                repeated += int(pending["json"].get("num_repeats", 1))
                pending = next(samples, None)
        entries.append({"url": name, "nsamples": count, "filesize": fs.size(posixpath.join(root, name)),
                        "repeated": repeated})
    written = {e["url"] for e in entries} | {INDEX_NAME}
    if prompts:
        with atomic_open(fs, posixpath.join(root, PROMPTS_NAME)) as f, webdataset.TarWriter(f) as tar:
            for sample in prompts:
                tar.write(sample)
        written.add(PROMPTS_NAME)
    write_json(fs, posixpath.join(root, INDEX_NAME), index_document(entries, meta or {}))
    for name in set(old) - written:
        fs.rm_file(posixpath.join(root, name))
    return [f"{prefix}/{e['url']}" for e in entries]


def index_document(entries: list[dict], meta: dict) -> dict:
    """A wids shard index: what `wids.ShardListDataset` reads, plus this project's description under "crepa"."""
    return {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": entries, "crepa": meta}


@dataclass
class ShardIndex:
    """The shards one `--cache` value names, in index order, with their sample counts and description."""

    url: str
    """Where the index was read from."""
    urls: list[str]
    nsamples: list[int]
    repeated: list[int]
    """Samples per shard with every clip's num_repeats applied."""
    meta: dict
    filesizes: list[int | None] = field(default_factory=list)
    """Bytes of each shard when it was indexed (None where the index does not say)."""


def _join(base: str, url: str) -> str:
    return url if "://" in url or url.startswith("/") else posixpath.join(base, url)


def read_index(cache: str) -> ShardIndex:
    """The index of a shard folder (path or URL), of the index file itself, or of a brace pattern / .tar in it."""
    if cache.endswith(".json"):
        index_url, wanted = cache, None
    elif cache.endswith(".tar") or "{" in cache:
        wanted = list(braceexpand.braceexpand(cache))
        folders = {posixpath.dirname(u) for u in wanted}
        if len(folders) > 1:
            raise UserError(f"--cache {cache} names shards in several folders ({', '.join(sorted(folders))}); "
                             f"pass one folder, or one {INDEX_NAME} listing them all")
        index_url = posixpath.join(folders.pop(), INDEX_NAME)
    else:
        index_url, wanted = posixpath.join(cache.rstrip("/"), INDEX_NAME), None
    fs, path = fsspec.core.url_to_fs(index_url)
    base = posixpath.dirname(index_url)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"no shard index {index_url}; `crepa cache export --format wds CACHE {base}` writes one with the "
            f"shards, and `crepa cache index {base}` writes one for shards made another way"
        )
    rewrite = f"rewrite it with `crepa cache index {base}`, or re-export the shards with `crepa cache export`"
    try:
        with fs.open(path, "r") as f:
            document = json.load(f)
        kind, meta = document.get("__kind__"), dict(document.get("crepa", {}))
        entries = {_join(base, e["url"]): (int(e["nsamples"]), int(e.get("repeated", e["nsamples"])),
                                           e.get("filesize")) for e in document["shardlist"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # bad JSON, missing or mistyped fields
        raise UserError(f"malformed shard index ({type(exc).__name__}: {exc})", where=index_url, fix=rewrite) from None
    if kind != INDEX_KIND:
        raise UserError(f"not a {INDEX_KIND} shard index", where=index_url, fix=rewrite)
    if wanted is not None:
        missing = [u for u in wanted if u not in entries]
        if missing:
            raise UserError(f"{index_url} does not list {', '.join(missing[:3])}; rewrite it with "
                             f"`crepa cache index {base}`")
        entries = {u: entries[u] for u in wanted}
    counts = list(entries.values())
    return ShardIndex(index_url, list(entries), [n for n, _, _ in counts], [r for _, r, _ in counts], meta,
                      [size for _, _, size in counts])


def open_shard(url: str) -> IO[bytes]:
    """Local paths, file:, pipe:, http(s):, gs: ... through webdataset's gopen; other schemes (s3:, ...) through
    fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url)
    return fsspec.open(url, "rb").open()


def shard_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Undecoded samples ({"__key__", "__url__", field: bytes}) of the shards, in order.

    A shard that cannot be read to its end (truncated, damaged) raises an error naming it and the fix.
    """
    current = {"url": None}

    def opened() -> Iterator[dict]:
        for url in urls:
            current["url"] = url
            with open_shard(url) as stream:  # closed once the tar reader asks for the next shard
                yield {"url": url, "stream": stream}

    try:
        yield from tariterators.group_by_keys(tariterators.tar_file_expander(opened()))
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"shard {current['url']} is missing",
                            fix="re-export the shards with `crepa cache export --format wds --overwrite`") from exc
        reason = str(exc.args[0] if exc.args else exc).split(" @ ")[0]  # tarfile appends the stream's repr
        raise UserError(f"shard {current['url']} is truncated or damaged ({type(exc).__name__}: {reason})",
                        fix="re-export it with `crepa cache export --format wds --overwrite`") from exc


def decoded(samples: Iterable[dict]) -> Iterator[dict]:
    """Arrays and dicts decoded; raises on the first bad member, naming the shard, sample and field."""
    try:
        yield from webdataset.decode(handler=webdataset.reraise_exception)(samples)
    except webdataset.DecodingError as exc:  # its own message is empty
        raise UserError(
            f"{exc.url}: field {exc.k!r} of sample {exc.key!r} cannot be decoded ({exc.__cause__!r}); "
            "re-export the shard with `crepa cache export`"
        ) from exc


def iter_webdataset(urls: list[str]) -> Iterator[dict]:
    """Samples of the shards at `urls` (paths or any URL webdataset or fsspec opens) with arrays and dicts decoded."""
    return decoded(shard_samples(urls))


def read_prompt_texts(index: ShardIndex) -> dict[str, dict]:
    """Prompt -> its text arrays ('text', maybe 'text_pooled') from the index's prompts file; {} without one."""
    if not index.meta.get("prompts"):
        return {}
    texts = {}
    for sample in iter_webdataset([_join(posixpath.dirname(index.url), index.meta["prompts"])]):
        texts[sample["json"]["caption"]] = {"text": sample["text.npy"]} | (
            {"text_pooled": sample["text_pooled.npy"]} if "text_pooled.npy" in sample else {})
    return texts


def write_index_for(folder: str) -> ShardIndex:
    """Count the samples of the `*.tar` shards in `folder` (made by hand or by an older export) into its index."""
    fs, root = fsspec.core.url_to_fs(folder)
    names = sorted(name for name in (posixpath.basename(p) for p in fs.glob(posixpath.join(root, "*.tar")))
                   if name != PROMPTS_NAME)
    if not names:
        raise FileNotFoundError(f"no *.tar shards in {folder}")
    base = folder.rstrip("/")
    counts = {name: [0, 0] for name in names}
    meta: dict = {}
    for sample in shard_samples([posixpath.join(base, n) for n in names]):
        if "json" not in sample:
            raise UserError(f"sample {sample['__key__']} of {sample['__url__']} has no json member")
        info = json.loads(sample["json"])
        meta = meta or {k: info[k] for k in META_KEYS if k in info}
        count = counts[posixpath.basename(sample["__url__"])]
        count[0] += 1
        count[1] += int(info.get("num_repeats", 1))
    entries = [{"url": n, "nsamples": c, "filesize": fs.size(posixpath.join(root, n)), "repeated": r}
               for n, (c, r) in counts.items()]
    write_json(fs, posixpath.join(root, INDEX_NAME), index_document(entries, meta))
    return read_index(folder)
