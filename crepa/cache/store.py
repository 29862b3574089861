"""The cache contract: per-key arrays in a Zarr v3 store, made visible segment by segment through a JSON manifest.

Layout under the cache root (DESIGN section 5):

    zarr.json                                          root attrs {"schema_version", "format"}
    <kind>/<fingerprint>/zarr.json                     feature set attrs (kind, identity, description)
    <kind>/<fingerprint>/<group>/<segment>/<array>     one entry per chunk along axis 0, one shard per array
    manifest/<kind>/<fingerprint>/<segment>.json       commit record: key -> row, meta, shapes, checksums
    plans/<name>.json                                  resolved configs written by the stages

A segment is written once, never appended to, and exists for readers only once its manifest file is
there; so a killed writer leaves at most an orphan segment and never a half-visible entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.codecs
from tqdm.auto import tqdm
from zarr.errors import ContainsGroupError
from zarr.storage import FsspecStore, LocalStore

from crepa.cache.atomic import fsync_tree, is_local, list_json, read_json_files, write_json
from crepa.cache.keys import fingerprint
from crepa.cache.rows import ByteSource, Rows, open_rows
from crepa.errors import UserError

SCHEMA_VERSION = 1
FEATURE_KINDS = ("latents", "teacher", "text", "condition")
CACHE_FORMAT = "crepa-cache"

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # group, array, writer and plan names become path components
_RESERVED_META = ("group", "segment", "row", "checksums")
_OFFSETS = ".offsets"  # suffix of the (n + 1,) offsets array stored beside each ragged array
CODECS = ("zstd", "blosc", "none")
"""Compression of stored arrays, chosen per writer; readers decode any of them from the Zarr metadata."""


@dataclass(frozen=True)
class FeatureSet:
    """One set of features (latents, teacher, text or image-to-video condition) computed with one identity; entries
    are keyed by clip or text."""

    kind: str
    """One of FEATURE_KINDS."""
    fingerprint: str
    """fingerprint({"kind": kind, **identity}): anything that changes the features changes this."""
    attrs: dict = field(compare=False)
    """{"kind": kind, "identity": identity, **description}; the description says what the arrays hold
    (family, model ids, dtypes, grids, temporal mapping, normalisation ...)."""

    @property
    def path(self) -> str:
        """`<kind>/<fingerprint>`, the set's folder in the store and in the manifest."""
        return f"{self.kind}/{self.fingerprint}"


@dataclass
class VerifyReport:
    """What `CacheStore.verify` found."""

    checked: int
    """Committed entries re-read."""
    problems: list[str] = field(default_factory=list)
    """One line per unreadable entry or per array whose shape, dtype or checksum differs from its commit."""
    damaged: dict[str, list[str]] = field(default_factory=dict)
    """Feature set path -> keys of its entries with a problem."""
    orphans: list[str] = field(default_factory=list)
    """Segments without a commit (`<kind>/<fingerprint>/<group>/<segment>`): data of an interrupted writer,
    ignored by readers and safe to delete."""

    @property
    def ok(self) -> bool:
        """True when every committed entry reads back as committed; orphans do not count against it."""
        return not self.problems


# What damaged or missing stored bytes raise when read: checksum and size checks (ValueError), codec failures
# (RuntimeError), a missing chunk or shard (FileNotFoundError, KeyError), a short read (EOFError). Other OSErrors
# (a network timeout, a permission change) and MemoryError are not the data's fault and pass through unchanged,
# so `verify` and `repair` never condemn good entries for them.
_DAMAGED_DATA_ERRORS = (ValueError, RuntimeError, KeyError, FileNotFoundError, EOFError)


class EntryReadError(UserError):
    """An array of a committed entry cannot be read back: its stored bytes are damaged or missing."""

    def __init__(self, fset: FeatureSet, key: str, array: str, cause: Exception):
        self.fset, self.key, self.array = fset, key, array
        self.cause = f"{type(cause).__name__}: {cause}"
        super().__init__(f"array {array} of {fset.path} entry {key} cannot be read ({self.cause})")


@dataclass
class RepairReport:
    """What `CacheStore.repair` removed, and the dataset configs whose `crepa precompute` recomputes it."""

    checked: int
    removed: list[str] = field(default_factory=list)
    """One line per removed entry: its feature set, key and clips."""
    configs: dict[str, str] = field(default_factory=dict)
    """dataset config path -> family, of every plan that lists a removed entry."""


def checksum(array: np.ndarray) -> str:
    """blake2b-128 of the array's C-order bytes, prefixed with the algorithm so it can change later."""
    return "blake2b:" + hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).hexdigest()


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{what} {name!r} must be a non-empty string of letters, digits, '_' or '-'")


def _check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise UserError(f"codec {codec!r} is unknown; use one of {', '.join(CODECS)}")
    return codec


def _compressors(codec: str) -> tuple[zarr.abc.codec.BytesBytesCodec, ...]:
    """The bytes-to-bytes codecs of an array; each chain holds a checksum so reads fail loudly on corruption."""
    if codec == "zstd":
        return (zarr.codecs.ZstdCodec(level=3, checksum=True),)
    if codec == "blosc":
        # zstd inside blosc (clevel 2 is zstd level 3); byte shuffle, its type size set from each array's dtype
        return (zarr.codecs.BloscCodec(cname="zstd", clevel=2, shuffle="shuffle"), zarr.codecs.Crc32cCodec())
    return (zarr.codecs.Crc32cCodec(),)


def _check_kind(kind: str) -> str:
    if kind not in FEATURE_KINDS:
        raise UserError(f"feature kind {kind!r} is not one of {FEATURE_KINDS}")
    return kind


def _jsonable(obj: Any, what: str) -> Any:
    """The object as it will read back from JSON (tuples become lists), or a clear error naming it."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} must be JSON-serialisable (plain str/int/float/bool/list/dict): {exc}") from None


def _check_root_attrs(url: str, attrs: dict) -> None:
    if attrs.get("format") != CACHE_FORMAT:
        raise UserError(
            f"{url} is a Zarr store but not a crepa cache (root attribute format={attrs.get('format')!r}); "
            "point to a cache made by `crepa precompute`"
        )
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"cache at {url} has schema version {attrs.get('schema_version')!r} but this crepa reads version "
            f"{SCHEMA_VERSION}; rebuild it with `crepa precompute ... --out <new url>` or use the crepa release "
            "that wrote it"
        )


class _Index:
    """Merged manifest of one feature set: the newest commit of every key, and every committed segment."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}
        """key -> {"group", "segment", "row", "shapes", "checksums", "meta", "order"}."""
        self.segments: dict[str, dict] = {}
        """segment id -> its manifest without the entries."""

    def apply(self, manifest: dict) -> None:
        """Merge one segment's manifest; a key keeps the entry of the newest commit."""
        order = (manifest["committed_ns"], manifest["segment"])
        self.segments[manifest["segment"]] = {k: v for k, v in manifest.items() if k != "entries"}
        for key, entry in manifest["entries"].items():
            old = self.entries.get(key)
            if old is None or old["order"] < order:
                where = {"group": manifest["group"], "segment": manifest["segment"], "order": order}
                self.entries[key] = {**entry, **where}


class CacheStore:
    """A cache directory or fsspec URL; open it with `CacheStore.open`.

    Readers keep the merged manifest of each feature set and the opened Zarr arrays in memory, so
    random access costs about one chunk read per array; call `refresh()` to see commits made since.
    """

    def __init__(self, url: str, mode: str, zstore: zarr.abc.store.Store, fs: fsspec.AbstractFileSystem, root: str):
        self.url = url
        self.mode = mode
        self._zstore = zstore
        self._fs = fs  # same root as the Zarr store; used for the manifest and plans
        self._root = root
        self._group = zarr.open_group(zstore, mode="r" if mode == "r" else "r+")
        self._indexes: dict[str, _Index] = {}
        self._arrays: dict[str, Rows] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._bytes = ByteSource(fs, root)

    @classmethod
    def open(cls, url: str, mode: str = "r") -> CacheStore:
        """Open a cache: mode "r" to read an existing one, mode "a" to create it if missing and write to it."""
        if mode not in ("r", "a"):
            raise UserError(f"mode={mode!r}: use 'r' to read a cache or 'a' to create or extend one")
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        exists = fs.exists(f"{root}/zarr.json")
        if not exists and mode == "r":
            raise FileNotFoundError(f"no cache at {url}; create one with `crepa precompute ... --out {url}`")
        # LocalStore for local disks (plain paths and file://): it creates folders and writes by atomic rename.
        if is_local(fs):
            zstore = LocalStore(root, read_only=mode == "r")
        else:
            zstore = FsspecStore.from_url(url, read_only=mode == "r")
        if not exists:
            with contextlib.suppress(ContainsGroupError):  # another process created it first
                zarr.create_group(zstore, attributes={"schema_version": SCHEMA_VERSION, "format": CACHE_FORMAT})
        _check_root_attrs(url, zarr.open_group(zstore, mode="r").attrs.asdict())
        return cls(url, mode, zstore, fs, root)

    def __reduce__(self):
        # DataLoader workers and spawned processes reopen the cache instead of copying caches and handles.
        return (type(self).open, (self.url, self.mode))

    def refresh(self) -> None:
        """Forget the manifests and arrays read so far, so commits made by other processes become visible."""
        self._indexes.clear()
        self._arrays.clear()
        self._offsets.clear()

    # ---- feature sets

    def feature_set(self, kind: str, identity: dict, description: dict, missing_ok: bool = False) -> FeatureSet:
        """The feature set of this identity: created with its attributes in mode "a", else it must exist.

        With `missing_ok` a read-only store answers for a set it does not hold with an empty one that is not
        written anywhere (what a dry run plans against).
        """
        _check_kind(kind)
        clash = {"kind", "identity"} & description.keys()
        if clash:
            raise UserError(f"description of a {kind} feature set must not hold {sorted(clash)}: they are set here")
        identity = _jsonable(identity, f"identity of the {kind} feature set")
        fset = FeatureSet(kind, fingerprint({"kind": kind, **identity}), {})
        try:
            group = zarr.open_group(self._zstore, path=fset.path, mode="r")
        except FileNotFoundError:
            attrs = _jsonable({"kind": kind, "identity": identity, **description}, f"description of {fset.path}")
            if self.mode == "r" and missing_ok:
                return FeatureSet(kind, fset.fingerprint, attrs)
            if self.mode == "r":
                known = [f.fingerprint for f in self.feature_sets(kind)]
                raise LookupError(
                    f"cache {self.url} has no {kind} feature set for identity {identity} (fingerprint "
                    f"{fset.fingerprint}; present: {known or 'none'}); run `crepa precompute` with these settings"
                ) from None
            try:
                group = self._group.create_group(fset.path, attributes=attrs)
            except ContainsGroupError:  # another process created it first
                group = zarr.open_group(self._zstore, path=fset.path, mode="r")
        return FeatureSet(kind, fset.fingerprint, group.attrs.asdict())

    def feature_sets(self, kind: str | None = None) -> list[FeatureSet]:
        """Every feature set in the cache (of one kind when given), sorted by kind then fingerprint."""
        out = []
        for k in FEATURE_KINDS if kind is None else (_check_kind(kind),):
            try:
                kind_group = zarr.open_group(self._zstore, path=k, mode="r")
            except FileNotFoundError:
                continue
            out += [FeatureSet(k, name, g.attrs.asdict()) for name, g in sorted(kind_group.groups())]
        return out

    # ---- reading

    def _index(self, fset: FeatureSet) -> _Index:
        index = self._indexes.get(fset.path)
        if index is None:
            index = _Index()
            paths = list_json(self._fs, f"{self._root}/manifest/{fset.path}")
            for manifest in read_json_files(self._fs, paths).values():
                index.apply(manifest)
            self._indexes[fset.path] = index
        return index

    def _record(self, fset: FeatureSet, key: str) -> dict:
        record = self._index(fset).entries.get(key)
        if record is None:
            raise KeyError(f"{fset.path} in {self.url} has no committed entry {key!r}; precompute it first")
        return record

    def _array(self, path: str) -> Rows:
        rows = self._arrays.get(path)
        if rows is None:
            rows = self._arrays[path] = open_rows(zarr.open_array(self._zstore, path=path, mode="r"), self._bytes)
        return rows

    def keys(self, fset: FeatureSet) -> set[str]:
        """Keys of the committed entries."""
        return set(self._index(fset).entries)

    def entry(self, fset: FeatureSet, key: str) -> dict:
        """Meta of a committed entry: the writer's meta plus "group", "segment", "row" and "checksums"."""
        record = self._record(fset, key)
        return {
            **record["meta"],
            "group": record["group"],
            "segment": record["segment"],
            "row": record["row"],
            "checksums": dict(record["checksums"]),
        }

    def read(self, fset: FeatureSet, key: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays `names` (default: all) of a committed entry; a ragged one comes back as this entry's slice."""
        record = self._record(fset, key)
        segment = self._index(fset).segments[record["segment"]]
        prefix = f"{fset.path}/{record['group']}/{record['segment']}"
        row = record["row"]
        out = {}
        for name, spec in segment["arrays"].items():
            if names is not None and name not in names:
                continue
            path = f"{prefix}/{name}"
            try:
                if spec["ragged"]:
                    offsets = self._offsets.get(path)
                    if offsets is None:
                        offsets = self._offsets[path] = self._array(f"{path}{_OFFSETS}").read(0)
                    out[name] = self._array(path).read(int(offsets[row]), int(offsets[row + 1]))
                else:
                    out[name] = self._array(path).read(row, row + 1)[0]  # (*entry shape)
            except _DAMAGED_DATA_ERRORS as exc:  # stored bytes that fail to decode or check, or a missing chunk
                raise EntryReadError(fset, key, name, exc) from exc
        return out

    # ---- writing

    def writer(
        self,
        fset: FeatureSet,
        *,
        ragged: Sequence[str] = (),
        writer_id: str | None = None,
        max_segment_bytes: int = 256 * 2**20,
        max_segment_entries: int = 64,
        codec: str = "zstd",
    ) -> SegmentWriter:
        """A buffered writer of entries into `fset`; see SegmentWriter. `codec` is one of CODECS."""
        self._check_writable("write entries")
        return SegmentWriter(self, fset, ragged, writer_id, max_segment_bytes, max_segment_entries, codec)

    def _check_writable(self, action: str) -> None:
        if self.mode != "a":
            raise PermissionError(f"cache {self.url} is open read-only; open it with mode='a' to {action}")

    def _write_segment(
        self, fset: FeatureSet, group: str, segment: str, manifest: dict, data: dict, codec: str = "zstd"
    ) -> None:
        """Write a segment's arrays with `codec`, then commit it with its manifest file (the only step readers see).

        `data`: array name -> (array, chunk rows along axis 0, attributes).
        """
        prefix = f"{fset.path}/{group}/{segment}"
        for name, (array, rows, attrs) in data.items():
            tail = tuple(max(1, d) for d in array.shape[1:])  # chunk sides must be >= 1
            zarray = self._group.create_array(
                f"{prefix}/{name}",
                shape=array.shape,
                dtype=array.dtype,
                chunks=(rows, *tail),
                shards=(rows * max(1, math.ceil(array.shape[0] / rows)), *tail),  # the whole array in one shard
                compressors=_compressors(codec),
                attributes=attrs,
            )
            zarray[...] = array
        if is_local(self._fs):
            fsync_tree(f"{self._root}/{prefix}")
        manifest["committed_ns"] = time.time_ns()  # orders commits of one key: the newest wins
        write_json(self._fs, f"{self._root}/manifest/{fset.path}/{segment}.json", manifest)
        index = self._indexes.get(fset.path)
        if index is not None:
            index.apply(manifest)

    # ---- plans

    def write_plan(self, name: str, plan: dict) -> None:
        """Atomically write `plans/<name>.json` (a stage's resolved config) next to the data it describes."""
        self._check_writable("write a plan")
        _check_name(name, "plan name")
        write_json(self._fs, f"{self._root}/plans/{name}.json", _jsonable(plan, f"plan {name!r}"))

    def remove_plan(self, name: str) -> None:
        """Delete `plans/<name>.json`, a plan another one now replaces; its entries stay in the store."""
        self._check_writable("remove a plan")
        _check_name(name, "plan name")
        self._fs.rm(f"{self._root}/plans/{name}.json")

    def write_report(self, name: str, report: dict) -> None:
        """Atomically write `reports/<name>.json`: what a run did, kept beside the data for later reading."""
        self._check_writable("write a report")
        _check_name(name, "report name")
        write_json(self._fs, f"{self._root}/reports/{name}.json", _jsonable(report, f"report {name!r}"))

    def plans(self) -> dict[str, dict]:
        """Every plan in the cache, by name."""
        files = read_json_files(self._fs, list_json(self._fs, f"{self._root}/plans"))
        return {posixpath.basename(path)[: -len(".json")]: plan for path, plan in files.items()}

    # ---- checks and summary

    def verify(self, progress: bool = False) -> VerifyReport:
        """Re-read every committed entry and compare shape, dtype and checksum with its commit; list orphans."""
        self.refresh()
        report = VerifyReport(checked=0)
        clips = self._clips_by_key()
        for fset in self.feature_sets():
            index = self._index(fset)
            for key, record in tqdm(sorted(index.entries.items()), desc=f"verify {fset.path}", disable=not progress):
                report.checked += 1
                problems = self._entry_problems(fset, key, record, index.segments[record["segment"]])
                if problems:
                    report.damaged.setdefault(fset.path, []).append(key)
                    where = (f"{fset.path} entry {key} ({self._describe(clips.get(key, []))}, group "
                             f"{record['group']}, segment {record['segment']})")
                    report.problems += [f"{where}: {problem}; `crepa cache repair {self.url}` removes it and "
                                        "says how to recompute it" for problem in problems]
            committed = set(index.segments)
            report.orphans += [
                f"{fset.path}/{group}/{segment}"
                for group, segments in self._segment_dirs(fset).items()
                for segment in segments
                if segment not in committed
            ]
        return report

    def _entry_problems(self, fset: FeatureSet, key: str, record: dict, segment: dict) -> list[str]:
        problems = []
        for name, spec in segment["arrays"].items():
            try:
                array = self.read(fset, key, [name])[name]
            except EntryReadError as exc:  # any decoding or I/O failure is what verify exists to report
                problems.append(f"array {name} is unreadable ({exc.cause})")
                continue
            shape = record["shapes"][name]
            if array.dtype.name != spec["dtype"]:
                problems.append(f"array {name} has dtype {array.dtype.name}, committed {spec['dtype']}")
            elif list(array.shape) != shape:
                problems.append(f"array {name} has shape {list(array.shape)}, committed {shape}")
            elif checksum(array) != record["checksums"][name]:
                problems.append(f"array {name} does not match its checksum (corrupted data)")
        return problems

    def _clips_by_key(self) -> dict[str, list[dict]]:
        """Clip or caption key -> the plans' clips it belongs to (each with its plan's dataset config)."""
        out: dict[str, list[dict]] = {}
        for plan in self.plans().values():
            for clip in plan.get("clips", []):
                entry = {**clip, "dataset_config": plan.get("dataset_config"), "family": plan.get("family")}
                out.setdefault(clip["key"], []).append(entry)
                if clip.get("text_key") != clip["key"]:
                    out.setdefault(clip.get("text_key"), []).append(entry)
        return out

    @staticmethod
    def _describe(clips: list[dict]) -> str:
        if not clips:
            return "in no dataset plan"
        sources = sorted({f"{c.get('dataset', '?')}/{c.get('source', '?')}" for c in clips})
        more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
        return "clip " + ", ".join(sources[:3]) + more

    def repair(self, progress: bool = False) -> RepairReport:
        """Remove the entries `verify` flags from their commits, so the next precompute recomputes exactly them.

        Each manifest holding a flagged key is rewritten without it (atomically, keeping its commit time), for
        every commit of that key, so no older copy takes its place; the data stays behind, unreferenced.
        """
        self._check_writable("repair it")
        verified = self.verify(progress)
        report = RepairReport(checked=verified.checked)
        clips = self._clips_by_key()
        for path, keys in sorted(verified.damaged.items()):
            bad = set(keys)
            folder = f"{self._root}/manifest/{path}"
            for file, manifest in read_json_files(self._fs, list_json(self._fs, folder)).items():
                if bad & manifest["entries"].keys():
                    manifest["entries"] = {k: v for k, v in manifest["entries"].items() if k not in bad}
                    write_json(self._fs, file, manifest)
            for key in sorted(bad):
                report.removed.append(f"{path} entry {key} ({self._describe(clips.get(key, []))})")
                for clip in clips.get(key, []):
                    if clip["dataset_config"]:
                        report.configs[clip["dataset_config"]] = clip["family"]
        self.refresh()
        return report

    def _segment_dirs(self, fset: FeatureSet) -> dict[str, list[str]]:
        """group -> segment folder names present in the store, committed or not."""
        out = {}
        for group_dir in self._subdirs(f"{self._root}/{fset.path}"):
            out[posixpath.basename(group_dir)] = [posixpath.basename(s) for s in self._subdirs(group_dir)]
        return out

    def _subdirs(self, path: str) -> list[str]:
        try:
            return sorted(i["name"].rstrip("/") for i in self._fs.ls(path, detail=True) if i["type"] == "directory")
        except FileNotFoundError:
            return []

    def info(self) -> dict:
        """Per feature set (`<kind>/<fingerprint>`): attrs, and per group the live entries and stored bytes."""
        out = {}
        for fset in self.feature_sets():
            index = self._index(fset)
            entries = Counter(record["group"] for record in index.entries.values())
            nbytes: Counter[str] = Counter()
            for group in {s["group"] for s in index.segments.values()}:
                group_dir = f"{self._root}/{fset.path}/{group}"
                for path, info in self._fs.find(group_dir, detail=True).items():
                    # path: <group_dir>/<segment>/<array>/...; only committed segments count
                    if posixpath.relpath(path, group_dir).split("/")[0] in index.segments:
                        nbytes[group] += info["size"]
            groups = {g: {"entries": entries[g], "bytes": nbytes[g]} for g in sorted(entries.keys() | nbytes.keys())}
            out[fset.path] = {
                "attrs": fset.attrs,
                "groups": groups,
                "entries": sum(entries.values()),
                "bytes": sum(nbytes.values()),
            }
        return out


@dataclass
class _Pending:
    """Entries of one group buffered for the next segment."""

    spec: dict[str, tuple[str, tuple[int, ...]]]
    """array name -> (dtype, shape without the ragged first dim) shared by every entry of the group."""
    entries: list[tuple[str, dict[str, np.ndarray], dict]] = field(default_factory=list)
    """(key, arrays, meta) in row order."""
    nbytes: int = 0
    """Bytes of the buffered arrays."""


class SegmentWriter:
    """Buffers entries per group and writes each group's buffer as one committed segment.

    A context manager: leaving the block normally flushes; leaving on an exception drops the
    buffered entries (nothing half-done is committed, a rerun redoes only those). Arrays named in
    `ragged` may vary in their first dim; they are stored concatenated beside an offsets array.
    """

    def __init__(
        self,
        store: CacheStore,
        fset: FeatureSet,
        ragged: Sequence[str],
        writer_id: str | None,
        max_segment_bytes: int,
        max_segment_entries: int,
        codec: str = "zstd",
    ):
        if writer_id is None:
            writer_id = f"w{os.getpid()}"
        _check_name(writer_id, "writer_id")
        if max_segment_entries < 1 or max_segment_bytes < 1:
            raise UserError("max_segment_entries and max_segment_bytes must be >= 1")
        self.store = store
        self.fset = fset
        self.writer_id = writer_id
        self.ragged = frozenset(ragged)
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_entries = max_segment_entries
        self.codec = _check_codec(codec)
        self._pending: dict[str, _Pending] = {}
        self._counter = 0
        self._closed = False

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pending.clear()
            self._closed = True

    def add(self, key: str, group: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        """Buffer one entry; the group's buffer is written as a segment once it reaches the size limits."""
        if self._closed:
            raise RuntimeError(f"writer {self.writer_id} of {self.fset.path} is closed; open a new one")
        if not isinstance(key, str) or not key:
            raise ValueError(f"entry key {key!r} must be a non-empty string")
        _check_name(group, "group")
        if not arrays:
            raise ValueError(f"entry {key!r} has no arrays")
        copies = {}
        for name, value in arrays.items():
            _check_name(name, f"array name of entry {key!r}")
            # Copy: the caller may reuse its buffers before the flush. Native byte order so checksums match reads.
            array = np.asarray(value)
            if array.dtype.hasobject or array.dtype.kind not in "biufc":
                raise ValueError(f"array {name} of entry {key!r} has dtype {array.dtype}; store numbers only")
            copies[name] = np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)
            if name in self.ragged and copies[name].ndim == 0:
                raise ValueError(f"ragged array {name} of entry {key!r} is a scalar; it needs a first dim to vary")
        meta = _jsonable(meta or {}, f"meta of entry {key!r}")
        reserved = set(_RESERVED_META) & meta.keys()
        if reserved:
            raise ValueError(f"meta of entry {key!r} uses reserved names {sorted(reserved)}; rename them")
        spec = {
            name: (a.dtype.name, a.shape[1:] if name in self.ragged else a.shape) for name, a in sorted(copies.items())
        }
        pending = self._pending.setdefault(group, _Pending(spec))
        if spec != pending.spec:
            raise ValueError(
                f"entry {key!r} of group {group!r} in {self.fset.path} has arrays {spec} but the group holds "
                f"{pending.spec}; every entry of a group needs the same names, dtypes and shapes (name the arrays "
                "whose first dim varies in ragged=)"
            )
        if any(key == k for k, _, _ in pending.entries):
            raise ValueError(f"entry {key!r} was added twice to group {group!r} before a flush")
        pending.entries.append((key, copies, meta))
        pending.nbytes += sum(a.nbytes for a in copies.values())
        if len(pending.entries) >= self.max_segment_entries or pending.nbytes >= self.max_segment_bytes:
            self._flush_group(group)

    def flush(self) -> None:
        """Write and commit every buffered entry."""
        for group in list(self._pending):
            self._flush_group(group)

    def close(self) -> None:
        """Flush, then refuse further entries."""
        if not self._closed:
            self.flush()
            self._closed = True

    def _flush_group(self, group: str) -> None:
        pending = self._pending.pop(group)
        # Unique without coordination: several writers may share a writer id across hosts.
        segment = f"{self.writer_id}-{self._counter:06d}-{secrets.token_hex(4)}"
        self._counter += 1
        entries = {
            key: {"row": row, "meta": meta, "shapes": {}, "checksums": {}}
            for row, (key, _, meta) in enumerate(pending.entries)
        }
        specs, data = {}, {}
        for name, (dtype, tail) in pending.spec.items():
            parts = [arrays[name] for _, arrays, _ in pending.entries]
            for (key, _, _), part in zip(pending.entries, parts, strict=True):
                entries[key]["shapes"][name] = list(part.shape)
                entries[key]["checksums"][name] = checksum(part)
            ragged = name in self.ragged
            attrs = {
                **self.fset.attrs,
                "array": name,
                "entry_shape": [None, *tail] if ragged else list(tail),
                "dtype": dtype,
                "ragged": ragged,
            }
            specs[name] = {"dtype": dtype, "entry_shape": attrs["entry_shape"], "ragged": ragged}
            if ragged:
                lengths = [p.shape[0] for p in parts]
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n + 1,)
                # (sum of lengths, *tail); chunks of the longest entry's length, so one entry spans <= 2 chunks
                data[name] = (np.concatenate(parts), max(1, *lengths), attrs)
                data[name + _OFFSETS] = (offsets, len(offsets), {"array": name + _OFFSETS, "offsets_of": name})
            else:
                data[name] = (np.stack(parts), 1, attrs)  # (n, *tail)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "segment": segment,
            "group": group,
            "writer": self.writer_id,
            "arrays": specs,
            "entries": entries,
        }
        self.store._write_segment(self.fset, group, segment, manifest, data, self.codec)
