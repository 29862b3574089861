"""Dataset definitions: a TOML file with a [general] table of defaults and one [[datasets]] table per source.

The layout follows musubi-tuner / diffusion-pipe habits so their users can port a file by renaming a few keys.
Everything is validated here, before any model is loaded, and every error names the file, the table, the field
and the fix. Relative paths are resolved against the TOML file's own folder, so a config travels with its data.
"""

from __future__ import annotations

import difflib
import glob
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import braceexpand

from crepa.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SOURCE_KINDS = ("video_directory", "video_jsonl_file", "image_directory", "image_jsonl_file", "hf_dataset",
                "webdataset")
IMAGE_FIELDS = {"hf_dataset": "image_column", "webdataset": "image_extension"}
"""The field that makes a table of these sources a table of images (set instead of the video one)."""
VIDEO_ONLY_FIELDS = ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps",
                     "video_column", "video_extension")
"""Fields that mean nothing for an image (a clip of one frame): refused in an image table, ignored from [general]."""
FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform")
CROPS = ("center", "none")
MAX_FRAME_COUNT = 100_000
"""Bound on every frame count of a table (target_frames, max_frames, frame_stride, frame_sample): over an hour at
24 fps, far beyond any clip; larger values are typos, and would make planning run for hours."""
MAX_SOURCE_FPS = 1000.0
"""Bound on source_fps: resampling above it only repeats frames, and each repeat is planned work."""
MAX_REPEATS = 10_000
"""Bound on num_repeats: the trainer lists each clip that many times per epoch."""


class DatasetConfigError(UserError):
    """A dataset TOML file that cannot be used as written."""


@dataclass
class DatasetConfig:
    """One [[datasets]] table after merging [general] defaults, resolving paths and validating."""

    name: str
    """Dataset name stored with every clip; defaults to the source's folder or file name."""
    resolutions: list[tuple[int, int]]
    """(width, height) buckets; each clip goes to the bucket whose aspect ratio is closest to its own."""
    target_frames: list[int]
    """Pixel frames per clip; each is t_c*k+1 for the model's temporal compression t_c (Wan: 4k+1); [1] for
    images."""
    frame_extraction: str = "head"
    """head: first target_frames; chunk: consecutive non-overlapping chunks; slide: a window every
    `frame_stride` frames; uniform: `frame_sample` windows spread evenly over the video."""
    frame_stride: int = 1
    """Step between window starts in `slide` mode."""
    frame_sample: int = 1
    """Number of windows in `uniform` mode."""
    max_frames: int | None = None
    """Consider only the first `max_frames` frames (after fps resampling) of each video; None: all."""
    source_fps: float | None = None
    """Resample each video to this frame rate before extraction (nearest frame by time); None keeps every frame."""
    crop: str = "center"
    """center: resize to cover the bucket, then center-crop; none: resize to the bucket, distorting aspect."""
    num_repeats: int = 1
    """How many times the trainer visits each clip of this dataset per epoch."""
    allow_empty_captions: bool = False
    """Cache clips whose caption is empty or whitespace (unconditional training); by default they are skipped."""
    video_directory: str | None = None
    """Folder of videos (searched recursively) with sidecar caption files of the same stem."""
    caption_extension: str = ".txt"
    """Extension of the sidecar caption files in `video_directory` or `image_directory`."""
    video_jsonl_file: str | None = None
    """JSON-lines file of {"video_path": ..., "caption": ...}; relative paths are resolved against its folder."""
    image_directory: str | None = None
    """Folder of images (jpg, png, webp; searched recursively) with sidecar caption files of the same stem; each
    image is cached as a clip of one frame."""
    image_jsonl_file: str | None = None
    """JSON-lines file of {"image_path": ..., "caption": ...}; relative paths are resolved against its folder."""
    hf_dataset: str | None = None
    """Folder written by `datasets.save_to_disk`, or a name for `datasets.load_dataset`."""
    hf_split: str = "train"
    """Split of `hf_dataset` to read."""
    video_column: str = "video"
    """Column of `hf_dataset` holding a video path or a {"bytes", "path"} dict."""
    image_column: str | None = None
    """Column of `hf_dataset` holding an image path or a {"bytes", "path"} dict (a `datasets.Image` column is read
    without decoding); set instead of `video_column` for a dataset of images."""
    caption_column: str = "caption"
    """Column of `hf_dataset` holding the caption."""
    webdataset: list[str] | None = None
    """Tar shards: a list of paths, or one brace/glob pattern ("shards/train-{000000..000099}.tar");
    stored expanded."""
    video_extension: str = "mp4"
    """Member extension of the video in each webdataset sample."""
    image_extension: str | None = None
    """Member extension of the image in each webdataset sample (jpg, png, webp); set instead of `video_extension`
    for shards of images."""
    caption_key: str = "txt"
    """Member extension of the caption in each webdataset sample."""
    origin: str = ""
    """Where the table was written ("file.toml [[datasets]] #2"), for error messages."""

    @property
    def source_kind(self) -> str:
        """Which of SOURCE_KINDS this dataset reads."""
        return next(kind for kind in SOURCE_KINDS if getattr(self, kind) is not None)

    @property
    def images(self) -> bool:
        """True when the dataset holds images: each becomes a clip of one frame (target_frames is [1])."""
        kind = self.source_kind
        field = IMAGE_FIELDS.get(kind)
        return kind.startswith("image_") or (field is not None and getattr(self, field) is not None)

    @property
    def medium(self) -> str:
        """"image" or "video", for messages."""
        return "image" if self.images else "video"


@dataclass
class DatasetConfigFile:
    """A whole dataset TOML file."""

    path: str
    """The TOML file."""
    temporal_compression: int
    """t_c the target_frames were validated against."""
    datasets: list[DatasetConfig]
    """One entry per [[datasets]] table, in file order."""


# Keys a user may write: every DatasetConfig field but the bookkeeping one, plus the single-bucket shorthand.
_KEYS = {f.name for f in fields(DatasetConfig)} - {"origin"} | {"resolution"}


def load_dataset_config(path: str, temporal_compression: int) -> DatasetConfigFile:
    """Parse and validate `path`; `temporal_compression` is the VAE's t_c (target_frames must be t_c*k+1)."""
    toml_path = Path(path)
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetConfigError(
            f"dataset config {path} does not exist; check the --config path of `crepa precompute`"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise DatasetConfigError(f"{path} is not valid TOML: {error}") from None
    for key in data:
        if key not in ("general", "datasets"):
            raise DatasetConfigError(
                f"{path}: unknown top-level key {key!r}{_suggest(key, ('general', 'datasets'))}; "
                "a dataset config holds a [general] table and [[datasets]] tables"
            )
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise DatasetConfigError(f"{path}: `general` must be a table: write [general] on its own line")
    general = _normalise_table(general, f"{path} [general]")
    tables = data.get("datasets")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise DatasetConfigError(f"{path}: add at least one [[datasets]] table (double brackets) naming a source")
    datasets = []
    for index, table in enumerate(tables, start=1):
        origin = f"{path} [[datasets]] #{index}"
        table = _normalise_table(table, origin)
        datasets.append(_build_dataset(general, table, origin, toml_path.parent, temporal_compression))
    seen: dict[str, str] = {}
    for dataset in datasets:
        if dataset.name in seen:
            raise DatasetConfigError(
                f"{dataset.origin}: name {dataset.name!r} is already used by {seen[dataset.name]}; "
                "set a distinct `name` in one of them"
            )
        seen[dataset.name] = dataset.origin
    return DatasetConfigFile(path=str(toml_path), temporal_compression=temporal_compression, datasets=datasets)


def valid_frame_counts_near(frames: int, temporal_compression: int) -> tuple[int, ...]:
    """The t_c*k+1 values on either side of `frames` (one value when `frames` is below the first)."""
    below = (frames - 1) // temporal_compression * temporal_compression + 1
    above = below + temporal_compression
    return (below, above) if below >= 1 else (above,)


def _suggest(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _normalise_table(table: dict, where: str) -> dict:
    """`table` with unknown keys rejected and the `resolution = [w, h]` shorthand turned into `resolutions`, so a
    table's shorthand overrides [general]'s list."""
    for key in table:
        if key not in _KEYS:
            raise DatasetConfigError(
                f"{where}: unknown field {key!r}{_suggest(key, _KEYS)}; known fields: {', '.join(sorted(_KEYS))}"
            )
    if "resolution" not in table:
        return table
    if "resolutions" in table:
        raise DatasetConfigError(f"{where}: `resolution` and `resolutions` are both set; keep one")
    table = dict(table)
    table["resolutions"] = [table.pop("resolution")]
    return table


_Fail = Callable[[str, str], DatasetConfigError]
"""Builds the error for (field, message) in one table."""


def _build_dataset(general: dict, table: dict, origin: str, base_dir: Path, temporal_compression: int) -> DatasetConfig:
    """Merge [general] under `table`, resolve paths, validate every field."""
    merged = {**general, **table}

    def fail(field: str, message: str) -> DatasetConfigError:
        where = " (set in [general])" if field in general and field not in table else ""
        return DatasetConfigError(f"{origin}: {field}{where} {message}")

    sources = [kind for kind in SOURCE_KINDS if kind in merged]
    if len(sources) != 1:
        listed = ", ".join(f"{kind} (from [general])" if kind not in table else kind for kind in sources)
        count = f"has {len(sources)} sources ({listed})" if sources else "has no source"
        raise DatasetConfigError(f"{origin} {count}; set exactly one of {', '.join(SOURCE_KINDS)}")
    kind = sources[0]
    images = kind.startswith("image_") or IMAGE_FIELDS.get(kind) in merged
    if images:
        reads = kind if kind.startswith("image_") else f"{kind} with {IMAGE_FIELDS[kind]}"
        for field in VIDEO_ONLY_FIELDS:
            if field in table:
                raise fail(field, f"applies to videos only, and this table reads images ({reads}), each a clip "
                                  "of one frame; remove it")
        merged = {key: value for key, value in merged.items() if key not in VIDEO_ONLY_FIELDS}

    if "resolutions" not in merged:
        raise DatasetConfigError(f"{origin}: set `resolutions = [[width, height], ...]` (e.g. [[832, 480]])")
    value = merged["resolutions"]
    if not isinstance(value, list) or not value:
        raise fail("resolutions", "must be a non-empty list of [width, height] pairs, e.g. [[832, 480]]")
    resolutions = list(dict.fromkeys(_resolution(item, fail) for item in value))
    # an image is one pixel frame: 1 = t_c*0+1 for every temporal compression, and one latent frame
    target_frames = [1] if images else _target_frames(merged, origin, fail, temporal_compression)

    values: dict[str, Any] = {}
    for field, check, hint in _FIELD_CHECKS:
        if field in merged:
            value = merged[field]
            if not check(value):
                choices = _CHOICES.get(field)
                raise fail(field, f"is {value!r}{_suggest(str(value), choices) if choices else ''}; it must be {hint}")
            values[field] = value
    if "source_fps" in values:
        values["source_fps"] = float(values["source_fps"])
    if values.get("max_frames") is not None and values["max_frames"] < min(target_frames):
        raise fail(
            "max_frames",
            f"is {values['max_frames']}, below the smallest target_frames ({min(target_frames)}), "
            "so no clip would fit; raise it or lower target_frames",
        )
    if "caption_extension" in values and not values["caption_extension"].startswith("."):
        values["caption_extension"] = "." + values["caption_extension"]
    for field in ("video_extension", "image_extension", "caption_key"):
        if field in values:
            values[field] = values[field].lstrip(".")

    values[kind], default_name = _resolve_source(kind, merged[kind], base_dir, fail)
    return DatasetConfig(
        name=values.pop("name", default_name),
        resolutions=resolutions,
        target_frames=target_frames,
        origin=origin,
        **values,
    )


def _target_frames(merged: dict, origin: str, fail: _Fail, temporal_compression: int) -> list[int]:
    """The table's target_frames, each checked to be t_c*k+1, without repeats."""
    if "target_frames" not in merged:
        raise DatasetConfigError(
            f"{origin}: set `target_frames`, e.g. [{4 * temporal_compression + 1}] "
            f"(values must be {temporal_compression}k+1)"
        )
    target_frames = merged["target_frames"]
    target_frames = [target_frames] if isinstance(target_frames, int) else target_frames
    if not isinstance(target_frames, list) or not target_frames or not all(_is_int(v) for v in target_frames):
        raise fail("target_frames", f"must be a list of integers, e.g. [{4 * temporal_compression + 1}]")
    for frames in target_frames:
        if frames > MAX_FRAME_COUNT:
            raise fail("target_frames", f"value {frames} is more than {MAX_FRAME_COUNT} frames; use clips of at most "
                                        f"a few hundred frames, e.g. [{4 * temporal_compression + 1}]")
        if frames < 1 or (frames - 1) % temporal_compression:
            nearest = " or ".join(str(v) for v in valid_frame_counts_near(frames, temporal_compression))
            raise fail(
                "target_frames",
                f"value {frames} is not {temporal_compression}k+1 (the model compresses time by "
                f"{temporal_compression}); use {nearest}",
            )
    return list(dict.fromkeys(target_frames))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_FRAME_COUNT


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


_CHOICES = {"frame_extraction": FRAME_EXTRACTIONS, "crop": CROPS}
# (field, check, what a valid value is) for the scalar fields.
_FIELD_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("frame_extraction", lambda v: v in FRAME_EXTRACTIONS, f"one of {', '.join(FRAME_EXTRACTIONS)}"),
    ("crop", lambda v: v in CROPS, f"one of {', '.join(CROPS)}"),
    ("frame_stride", _is_count, f"an integer from 1 to {MAX_FRAME_COUNT}"),
    ("frame_sample", _is_count, f"an integer from 1 to {MAX_FRAME_COUNT}"),
    ("num_repeats", lambda v: _is_int(v) and 1 <= v <= MAX_REPEATS, f"an integer from 1 to {MAX_REPEATS}"),
    ("max_frames", _is_count, f"an integer from 1 to {MAX_FRAME_COUNT} (leave it out for no cap)"),
    ("source_fps", lambda v: _is_number(v) and math.isfinite(v) and 0 < v <= MAX_SOURCE_FPS,
     f"a frame rate above 0 and at most {MAX_SOURCE_FPS:g} (leave it out to keep every frame)"),
    ("allow_empty_captions", lambda v: isinstance(v, bool), "true or false"),
    ("name", lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    ("caption_extension", _is_text, "a file extension such as '.txt'"),
    ("hf_split", _is_text, "a split name such as 'train'"),
    ("video_column", _is_text, "a column name"),
    ("image_column", _is_text, "a column name"),
    ("caption_column", _is_text, "a column name"),
    ("video_extension", _is_text, "a member extension such as 'mp4'"),
    ("image_extension", _is_text, "a member extension such as 'jpg'"),
    ("caption_key", _is_text, "a member extension such as 'txt'"),
)


def _resolution(value: Any, fail: _Fail) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)):
        raise fail(
            "resolutions", f"entry {value!r} is not a [width, height] pair of positive integers, e.g. [832, 480]"
        )
    return value[0], value[1]


def _is_url(value: str) -> bool:
    return "://" in value


def _local_path(value: str, base_dir: Path) -> Path:
    """`value` with ~ expanded, relative to the TOML file's folder unless absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _resolve_source(kind: str, value: Any, base_dir: Path, fail: _Fail) -> tuple[Any, str]:
    """(resolved source value, default dataset name) for one source field."""
    if kind == "webdataset":
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns or not all(_is_text(p) for p in patterns):
            raise fail(kind, "must be a tar path, a brace/glob pattern, or a list of tar paths")
        shards = [shard for pattern in patterns for shard in _expand_shards(pattern, base_dir, fail)]
        stem = re.split(r"[{*?\[]", Path(patterns[0]).name)[0].split(".")[0]
        return shards, re.sub(r"[-_]?\d*$", "", stem) or "webdataset"
    if not _is_text(value):
        raise fail(kind, f"is {value!r}; it must be a path")
    if kind == "hf_dataset":
        path = _local_path(value, base_dir)
        if path.exists():
            return str(path), path.name
        if value.startswith(("/", ".", "~")) or _is_url(value):
            raise fail(kind, f"path {path} does not exist; fix the path (relative paths start at {base_dir})")
        return value, value.rstrip("/").split("/")[-1]  # a name for datasets.load_dataset
    if _is_url(value):
        return value, Path(value).stem
    path = _local_path(value, base_dir)
    if kind.endswith("_directory") and not path.is_dir():
        raise fail(kind, f"folder {path} does not exist; fix the path (relative paths start at {base_dir})")
    if kind.endswith("_jsonl_file") and not path.is_file():
        raise fail(kind, f"file {path} does not exist; fix the path (relative paths start at {base_dir})")
    return str(path), path.stem if kind.endswith("_jsonl_file") else path.name


def _expand_shards(pattern: str, base_dir: Path, fail: _Fail) -> list[str]:
    """Brace-expand, then glob local patterns; every local shard must exist."""
    if _is_url(pattern):
        return list(braceexpand.braceexpand(pattern))
    shards = []
    for expanded in braceexpand.braceexpand(str(_local_path(pattern, base_dir))):
        if re.search(r"[*?[]", expanded):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise fail("webdataset", f"pattern {expanded} matches no file; fix the pattern")
            shards.extend(matches)
        elif not Path(expanded).is_file():
            raise fail("webdataset", f"shard {expanded} does not exist; fix the path or the brace range")
        else:
            shards.append(expanded)
    return shards
