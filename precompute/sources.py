"""Sources: one dataset config -> its videos, each with a stable identity and its caption.

A missing caption does not stop iteration: it is reported on the item so the run can skip the video and list
it. A source that cannot be read at all (bad JSON line, missing column, missing file) raises, naming the line,
row or member and the fix, before any model is loaded.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec

from crepa.cache.keys import bytes_identity, file_identity
from precompute.dataset_config import DatasetConfig
from precompute.decode import VideoSource

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset, ready to probe and decode."""

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
    """What PyAV opens: a path, or the encoded file's bytes (both pickle to decode workers)."""


def iter_videos(dataset: DatasetConfig) -> Iterator[VideoItem]:
    """The videos of `dataset` in a deterministic order (sorted paths, file or row order)."""
    readers = {
        "video_directory": _directory_items,
        "video_jsonl_file": _jsonl_items,
        "hf_dataset": _hf_items,
        "webdataset": _webdataset_items,
    }
    count = 0
    for item in readers[dataset.source_kind](dataset):
        count += 1
        yield item
    if count == 0:
        raise ValueError(f"{dataset.origin}: dataset {dataset.name!r} holds no videos; check its {dataset.source_kind}")


def _caption_file(video: Path, extension: str) -> tuple[str | None, str | None]:
    """(caption, error) from the sidecar file beside `video`."""
    path = video.with_suffix(extension)
    try:
        return path.read_text(encoding="utf-8").strip(), None
    except FileNotFoundError:
        return None, f"missing caption file {path.name} beside {video.name}; add it or set caption_extension"
    except UnicodeDecodeError as error:
        return None, f"caption file {path.name} is not UTF-8 ({error}); re-save it as UTF-8"


def _directory_items(dataset: DatasetConfig) -> Iterator[VideoItem]:
    root = Path(dataset.video_directory)
    videos = sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )
    for path in videos:
        caption, error = _caption_file(path, dataset.caption_extension)
        name = path.relative_to(root).as_posix()
        yield VideoItem(dataset.name, name, file_identity(str(path)), caption, error, str(path))


def _jsonl_items(dataset: DatasetConfig) -> Iterator[VideoItem]:
    jsonl = dataset.video_jsonl_file
    folder = posixpath.dirname(jsonl) if "://" in jsonl else os.path.dirname(jsonl)
    with fsspec.open(jsonl, "r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{jsonl} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error}); fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get("video_path"), str):
                raise ValueError(f'{where} has no "video_path" string; each line needs {{"video_path", "caption"}}')
            video_path = record["video_path"]
            path = _resolve(video_path, folder)
            caption, error = record.get("caption"), None
            if not isinstance(caption, str):
                caption, error = None, f'{where} has no "caption" string; add one'
            else:
                caption = caption.strip()
            yield VideoItem(dataset.name, video_path, _identity_of_path(path, where), caption, error, path)


def _resolve(path: str, folder: str | None) -> str:
    """`path`, joined to `folder` when it is relative and there is a folder to resolve it against."""
    if folder is None or "://" in path or os.path.isabs(path):
        return path
    return posixpath.join(folder, path) if "://" in folder else os.path.join(folder, path)


def _identity_of_path(path: str, where: str) -> dict:
    try:
        return file_identity(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: video {path} does not exist; fix the path or remove the entry") from None


def _hf_items(dataset: DatasetConfig) -> Iterator[VideoItem]:
    import datasets  # heavy; only this source kind needs it

    local = Path(dataset.hf_dataset)
    if local.exists():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if dataset.hf_split not in loaded:
                raise ValueError(
                    f"{dataset.origin}: hf_split {dataset.hf_split!r} is not in {local}; use one of {', '.join(loaded)}"
                )
            loaded = loaded[dataset.hf_split]
    else:
        loaded = datasets.load_dataset(dataset.hf_dataset, split=dataset.hf_split)
    for field in ("video_column", "caption_column"):
        column = getattr(dataset, field)
        if column not in loaded.column_names:
            raise ValueError(
                f"{dataset.origin}: {field} {column!r} is not a column of {dataset.hf_dataset}; "
                f"columns: {', '.join(loaded.column_names)}"
            )
    if isinstance(loaded.features[dataset.video_column], datasets.Video):
        # {"bytes", "path"} dicts instead of decoder objects: PyAV decodes, in the workers.
        loaded = loaded.cast_column(dataset.video_column, datasets.Video(decode=False))
    rows = loaded.select_columns(list(dict.fromkeys([dataset.video_column, dataset.caption_column])))
    for row, record in enumerate(rows):
        where = f"{dataset.hf_dataset} row {row}"
        value = record[dataset.video_column]
        if isinstance(value, dict) and value.get("bytes"):
            name = value.get("path") or f"{dataset.name}[{row}]"
            video, identity = value["bytes"], bytes_identity(value["bytes"], name)
        else:
            name = value.get("path") if isinstance(value, dict) else value
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: column {dataset.video_column!r} holds no video path or bytes")
            video = _resolve(name, str(local) if local.exists() else None)
            identity = _identity_of_path(video, where)
        caption, error = record[dataset.caption_column], None
        if not isinstance(caption, str):
            caption, error = None, f"{where} has no caption in column {dataset.caption_column!r}; fill it in"
        else:
            caption = caption.strip()
        yield VideoItem(dataset.name, name, identity, caption, error, video)


def _webdataset_items(dataset: DatasetConfig) -> Iterator[VideoItem]:
    from webdataset.tariterators import group_by_keys, tar_file_expander  # heavy (imports torch)

    for shard in dataset.webdataset:
        shard_name = PurePosixPath(shard).name
        with fsspec.open(shard, "rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])):
                key = sample["__key__"]
                name = f"{shard_name}/{key}"
                data = sample.get(dataset.video_extension)
                if data is None:
                    members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
                    raise ValueError(
                        f"{dataset.origin}: sample {name} has no .{dataset.video_extension} member (it has: "
                        f"{members}); set video_extension to the member holding the video"
                    )
                caption, error = None, None
                if dataset.caption_key not in sample:
                    error = f"sample {name} has no .{dataset.caption_key} member; add it or set caption_key"
                else:
                    try:
                        caption = sample[dataset.caption_key].decode("utf-8").strip()
                    except UnicodeDecodeError as decode_error:
                        error = f"caption member {name}.{dataset.caption_key} is not UTF-8 ({decode_error})"
                yield VideoItem(dataset.name, name, bytes_identity(data, name), caption, error, data)
