"""Sources: one dataset config -> its videos (or images), each with a stable identity and its caption.

A missing caption does not stop iteration: it is reported on the item so the run can skip the video and list
it. A source that cannot be read at all (bad JSON line, missing column, missing file) raises, naming the line,
row or member and the fix, before any model is loaded.

Ranks share the videos in turn by location (see `iter_videos`), and each source lists its videos cheaply before
anything costly is done: only this rank's videos are stat'ed, hashed or read. Videos inside bigger files (tar
members, dataset rows) are read once, for their content hash (their identity) and for planning's probe, and
yielded with a reference (precompute.video_refs) that the plan keeps instead of the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec

from crepa.cache.keys import bytes_identity, file_identity
from crepa.errors import UserError
from precompute.dataset_config import DatasetConfig
from precompute.decode import VideoSource
from precompute.images import IMAGE_EXTENSIONS
from precompute.video_refs import DatasetRow, ShardMember, hf_split, video_column

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")


@dataclass(frozen=True)
class VideoItem:
    """One video (or image, in a dataset of images) of a dataset, ready to probe and decode."""

    dataset: str
    """Name of the dataset it comes from."""
    name: str
    """Display name: path relative to the source, JSONL path, row or shard member."""
    identity: dict
    """Source identity for the clip key: path + size + mtime for files, content hash for in-memory bytes."""
    caption: str | None
    """Caption text; None when it is missing (see caption_error)."""
    caption_error: str | None
    """Why there is no caption, and how to fix it."""
    video: VideoSource
    """What PyAV opens: a path, or a reference to a tar member or dataset row (read when opened)."""
    problem: str | None = None
    """Why the video cannot be used at all (a broken link), and how to fix it; the run lists it as skipped."""
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    """The encoded bytes behind a reference, read once for the content hash; planning probes them and drops them
    with the item, and the plan keeps only `video`. None for paths."""

    @property
    def probe_source(self) -> VideoSource:
        """What planning probes: the bytes already read, else `video`."""
        return self.video if self.data is None else self.data


def iter_videos(dataset: DatasetConfig, rank: int = 0, world: int = 1,
                dealt: dict[str, int] | None = None) -> Iterator[VideoItem]:
    """This rank's videos of `dataset` in a deterministic order (sorted paths, file or row order).

    Videos are dealt to ranks in turn by location (an absolute path, URL, shard member or dataset row); `dealt`
    remembers each location's rank, across the datasets of a run when the caller shares it, so every listing of
    one video (a repeated manifest line, one folder in two dataset tables) lands on the rank that keeps it once.
    """
    dealt = {} if dealt is None else dealt
    readers = {
        "video_directory": _directory_items,
        "video_jsonl_file": _jsonl_items,
        "image_directory": _directory_items,
        "image_jsonl_file": _jsonl_items,
        "hf_dataset": _hf_items,
        "webdataset": _webdataset_items,
    }
    listed = False
    for location, make_item in readers[dataset.source_kind](dataset):
        listed = True
        if dealt.setdefault(location, len(dealt) % world) == rank:
            yield make_item()
    if not listed:
        raise UserError(f"{dataset.origin}: dataset {dataset.name!r} holds no {dataset.medium}s; check its "
                        f"{dataset.source_kind}")


_Lazy = Iterator[tuple[str, Callable[[], VideoItem]]]
"""A source lists its videos as (location, function that builds the item): only the rank's own are built."""


def _caption_file(video: Path, extension: str) -> tuple[str | None, str | None]:
    """(caption, error) from the sidecar file beside `video`."""
    path = video.with_suffix(extension)
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except FileNotFoundError:
        return None, f"missing caption file {path.name} beside {video.name}; add it or set caption_extension"
    except UnicodeDecodeError as error:
        return None, f"caption file {path.name} is not UTF-8 ({error}); re-save it as UTF-8"


def _directory_items(dataset: DatasetConfig) -> _Lazy:
    root = Path(getattr(dataset, dataset.source_kind))
    extensions = IMAGE_EXTENSIONS if dataset.images else VIDEO_EXTENSIONS
    videos = sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in extensions and not path.name.startswith(".")
        and (path.is_file() or _is_broken_link(path))
    )

    def item(path: Path) -> VideoItem:
        name = path.relative_to(root).as_posix()
        if _is_broken_link(path):
            problem = f"broken link: it points to {os.readlink(path)}, which does not exist; fix or remove the link"
            return VideoItem(dataset.name, name, {}, None, None, str(path), problem)
        caption, error = _caption_file(path, dataset.caption_extension)
        return VideoItem(dataset.name, name, file_identity(str(path)), caption, error, str(path))

    for path in videos:
        yield os.path.abspath(path), lambda path=path: item(path)


def _is_broken_link(path: Path) -> bool:
    """A symlink whose target is gone: listed so the run can say so, where a plain listing would drop it."""
    return path.is_symlink() and not path.exists()


def _jsonl_items(dataset: DatasetConfig) -> _Lazy:
    jsonl = getattr(dataset, dataset.source_kind)
    folder = posixpath.dirname(jsonl) if "://" in jsonl else os.path.dirname(jsonl)
    path_key = f"{dataset.medium}_path"

    def item(record: dict, where: str) -> VideoItem:
        video_path = record[path_key]
        path = _resolve(video_path, folder)
        caption, error = record.get("caption"), None
        if not isinstance(caption, str):
            caption, error = None, f'{where} has no "caption" string; add one'
        else:
            caption = caption.strip()
        return VideoItem(dataset.name, video_path, _identity_of_path(path, where, dataset.medium), caption, error,
                         path)

    with fsspec.open(jsonl, "r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{jsonl} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where} is not valid JSON ({error}); fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(path_key), str):
                raise UserError(f'{where} has no "{path_key}" string; each line needs {{"{path_key}", "caption"}}')
            location = _resolve(record[path_key], folder)
            yield (location if "://" in location else os.path.abspath(location),
                   lambda record=record, where=where: item(record, where))


def _resolve(path: str, folder: str | None) -> str:
    """`path`, joined to `folder` when it is relative and there is a folder to resolve it against."""
    if folder is None or "://" in path or os.path.isabs(path):
        return path
    return posixpath.join(folder, path) if "://" in folder else os.path.join(folder, path)


def _identity_of_path(path: str, where: str, medium: str) -> dict:
    try:
        return file_identity(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: {medium} {path} does not exist; fix the path or remove the entry") from None


def _hf_items(dataset: DatasetConfig) -> _Lazy:
    local = Path(dataset.hf_dataset)
    try:
        loaded = hf_split(dataset.hf_dataset, dataset.hf_split)
    except ValueError as error:
        raise UserError(f"{dataset.origin}: {error}") from None
    media_field = f"{dataset.medium}_column"
    media = getattr(dataset, media_field)
    for field in (media_field, "caption_column"):
        column = getattr(dataset, field)
        if column not in loaded.column_names:
            raise UserError(
                f"{dataset.origin}: {field} {column!r} is not a column of {dataset.hf_dataset}; "
                f"columns: {', '.join(loaded.column_names)}"
            )
    videos = video_column(dataset.hf_dataset, dataset.hf_split, media)
    captions = loaded.select_columns([dataset.caption_column])

    def item(row: int) -> VideoItem:
        where = f"{dataset.hf_dataset} row {row}"
        value = videos[row][media]
        if isinstance(value, dict) and value.get("bytes"):
            name = value.get("path") or f"{dataset.name}[{row}]"
            video = DatasetRow(dataset.hf_dataset, dataset.hf_split, media, row)
            data = value["bytes"]
        else:
            data = None
            name = value.get("path") if isinstance(value, dict) else value
            if not isinstance(name, str) or not name:
                raise UserError(f"{where}: column {media!r} holds no {dataset.medium} path or bytes")
            video = _resolve(name, str(local) if local.exists() else None)
        caption, error = captions[row][dataset.caption_column], None
        if not isinstance(caption, str):
            caption, error = None, f"{where} has no caption in column {dataset.caption_column!r}; fill it in"
        else:
            caption = caption.strip()
        identity = _identity_of_path(video, where, dataset.medium) if data is None else bytes_identity(data, name)
        return VideoItem(dataset.name, name, identity, caption, error, video, data=data)

    for row in range(len(loaded)):
        yield f"{dataset.hf_dataset}:{dataset.hf_split}:{row}", lambda row=row: item(row)


def _webdataset_items(dataset: DatasetConfig) -> _Lazy:
    for shard in dataset.webdataset:
        for key, members in _shard_samples(shard):
            yield f"{shard}#{key}", lambda key=key, members=members, shard=shard: _webdataset_item(dataset, shard, key,
                                                                                                  members)


def _webdataset_item(dataset: DatasetConfig, shard: str, key: str, members: dict[str, ShardMember]) -> VideoItem:
    name = f"{PurePosixPath(shard).name}/{key}"
    extension_field = f"{dataset.medium}_extension"
    extension = getattr(dataset, extension_field)
    video = members.get(extension)
    if video is None:
        listing = ", ".join(sorted(members))
        raise UserError(
            f"{dataset.origin}: sample {name} has no .{extension} member (it has: {listing}); "
            f"set {extension_field} to the member holding the {dataset.medium}"
        )
    caption, error = None, None
    with fsspec.open(shard, "rb") as stream:  # one open per sample: its caption and video
        if dataset.caption_key not in members:
            error = f"sample {name} has no .{dataset.caption_key} member; add it or set caption_key"
        else:
            try:
                caption = members[dataset.caption_key].read_from(stream).decode("utf-8").strip()
            except UnicodeDecodeError as decode_error:
                error = f"caption member {name}.{dataset.caption_key} is not UTF-8 ({decode_error})"
        data = video.read_from(stream)
    return VideoItem(dataset.name, name, bytes_identity(data, name), caption, error, video, data=data)


def _shard_samples(shard: str) -> Iterator[tuple[str, dict[str, ShardMember]]]:
    """(sample key, {extension: member}) of one tar shard, reading its headers only (members are grouped by the
    name before the first dot of their file name, as webdataset groups them)."""
    samples: dict[str, dict[str, ShardMember]] = {}
    with fsspec.open(shard, "rb") as stream:
        try:
            archive = tarfile.open(fileobj=stream, mode="r:")
        except tarfile.ReadError as error:
            raise UserError(f"{shard} is not an uncompressed tar ({error}); members are read by byte range, "
                             "so decompress the shard (e.g. gunzip) first") from None
        with archive:
            for info in archive:
                folder, _, file_name = info.name.rpartition("/")
                if not info.isfile() or "." not in file_name:
                    continue
                stem, extension = file_name.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                if samples and key not in samples:
                    yield samples.popitem()
                samples.setdefault(key, {})[extension.lower()] = ShardMember(shard, info.name, info.offset_data,
                                                                              info.size)
    yield from samples.items()
