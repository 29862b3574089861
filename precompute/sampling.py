"""Which frames of a video become clips, and which bucket they go to.

Frame selection follows musubi-tuner's `frame_extraction` modes, applied after an optional resampling to
`source_fps`, so a 30 fps and a 24 fps video yield clips of the same duration per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crepa.errors import UserError
from precompute.dataset_config import DatasetConfig
from precompute.decode import VideoSource, open_video, stream_fps


@dataclass(frozen=True)
class VideoInfo:
    """What planning needs to know about a video."""

    num_frames: int
    """Frames in the first video stream."""
    fps: float | None
    """Its nominal frame rate; None for an image."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""


@dataclass(frozen=True)
class Segment:
    """One window of a video that becomes one clip."""

    start: int
    """First frame of the window, counted at `fps` (after resampling)."""
    num_frames: int
    """Frames in the window: one of target_frames."""
    fps: float | None
    """Frame rate of the clip: source_fps when set, else the video's (None for an image)."""
    frame_indices: tuple[int, ...]
    """The source frame decoded for each clip frame (repeats when upsampling the frame rate)."""


@dataclass(frozen=True)
class SegmentPlan:
    """The segments of one video, or why it has none."""

    segments: list[Segment]
    """Windows in extraction order, without duplicates."""
    reason: str | None = None
    """Why `segments` is empty (the video is too short)."""


def probe_video(source: VideoSource) -> VideoInfo:
    """Frame count, rate and size of `source`'s first video stream; frames are counted by decoding only when the
    container does not record them."""
    with open_video(source) as container:
        if not container.streams.video:
            raise UserError("the file has no video stream")
        stream = container.streams.video[0]
        num_frames = stream.frames or sum(1 for _ in container.decode(stream))
        return VideoInfo(num_frames, stream_fps(stream), stream.codec_context.width, stream.codec_context.height)


def resampled_indices(info: VideoInfo, source_fps: float | None) -> list[int]:
    """Source frame index shown at each tick of `source_fps` (every frame when None), nearest frame by time."""
    if source_fps is None:
        return list(range(info.num_frames))
    step = info.fps / source_fps  # source frames per resampled frame
    count = math.ceil(info.num_frames / step - 1e-6)  # ticks j with j / source_fps < duration
    return [min(math.floor(j * step + 0.5), info.num_frames - 1) for j in range(count)]


def plan_segments(info: VideoInfo, dataset: DatasetConfig) -> SegmentPlan:
    """Windows of `target_frames` frames chosen by `dataset.frame_extraction`, after fps resampling and the
    `max_frames` cap.

    Work is bounded by the video's own frames: per target_frames value, at most one window starts on each source
    frame (resampling above the video's rate repeats frames, so windows starting on a repeat add little), and
    `uniform` never asks for more windows than there are distinct starts.
    """
    indices = resampled_indices(info, dataset.source_fps)
    if dataset.max_frames is not None:
        indices = indices[: dataset.max_frames]
    available = len(indices)
    fps = dataset.source_fps or info.fps
    segments: dict[tuple[int, ...], Segment] = {}  # by the source frames they show: equal frames, equal clip
    for frames in dataset.target_frames:
        if available < frames:
            continue
        started: set[int] = set()  # source frames a window of this length already starts on
        for start in _window_starts(dataset, available, frames):
            if indices[start] in started:
                continue
            started.add(indices[start])
            shown = tuple(indices[start : start + frames])
            segments.setdefault(shown, Segment(start, frames, fps, shown))
    if segments:
        return SegmentPlan(list(segments.values()))
    counted = f"{available} frames" + (f" at {fps:g} fps" if dataset.source_fps else "")
    smallest = min(dataset.target_frames)
    return SegmentPlan([], f"too short: {counted}, fewer than the smallest target_frames ({smallest})")


def _window_starts(dataset: DatasetConfig, available: int, frames: int) -> range | list[int]:
    """Starts (in the resampled timeline) of the windows of `frames` frames, in extraction order."""
    last = available - frames
    if dataset.frame_extraction == "head":
        return [0]
    if dataset.frame_extraction == "chunk":
        return range(0, last + 1, frames)
    if dataset.frame_extraction == "slide":
        return range(0, last + 1, dataset.frame_stride)
    if dataset.frame_extraction == "uniform":
        count = min(dataset.frame_sample, last + 1)  # more would only repeat starts
        return [last * i // (count - 1) if count > 1 else 0 for i in range(count)]
    raise UserError(f"{dataset.origin}: frame_extraction={dataset.frame_extraction!r} is unknown")


def choose_bucket(width: int, height: int, resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) bucket whose aspect ratio is closest to the clip's (in log ratio, so 2:1 and 1:2 are
    equally far from 1:1); among equal aspect ratios, the one closest in area, to avoid needless upscaling."""

    def distance(bucket: tuple[int, int]) -> tuple[float, float]:
        aspect = abs(math.log((width / height) / (bucket[0] / bucket[1])))
        area = abs(math.log((width * height) / (bucket[0] * bucket[1])))
        return round(aspect, 9), area

    return min(resolutions, key=distance)


def bucket_name(frames: int, height: int, width: int) -> str:
    """Name of the group of clips sharing one array shape, e.g. f81_h480_w832."""
    return f"f{frames}_h{height}_w{width}"
