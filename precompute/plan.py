"""Planning: dataset config -> the list of clips to cache, each with its keys, before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

from crepa.cache.keys import clip_key, text_key
from crepa.errors import UserError
from precompute.dataset_config import DatasetConfig
from precompute.decode import DecodeTask, VideoSource
from precompute.images import ImageTask, image_size
from precompute.sampling import Segment, VideoInfo, bucket_name, choose_bucket, plan_segments, probe_video
from precompute.sources import VideoItem, iter_videos


@dataclass
class PlannedClip:
    """One segment of one video (or one image, a clip of one frame), resized into one bucket: the unit of the
    cache."""

    key: str
    """Clip key: source identity + segment + bucket + crop."""
    dataset: str
    source: str
    """Display name of the video (path or member name)."""
    video: VideoSource
    """What PyAV (PIL for an image) opens: a path/URL, or a reference to a tar member or dataset row (never the
    bytes)."""
    caption: str
    text_key: str
    frames: int
    height: int
    width: int
    frame_indices: tuple[int, ...]
    fps: float | None
    """Frame rate of the sampled frames: the dataset's source_fps when it resamples, else the video's; None for an
    image."""
    crop: str
    num_repeats: int
    image: bool = False
    """An image (decoded with PIL), not a video segment."""

    @property
    def group(self) -> str:
        return bucket_name(self.frames, self.height, self.width)

    def decode_task(self, task_id: int) -> DecodeTask:
        """The decode pool's task for this clip's frames, resized into its bucket."""
        task = ImageTask if self.image else DecodeTask
        return task(task_id=task_id, source=self.video, frame_indices=self.frame_indices,
                    size=(self.width, self.height), crop=self.crop)

    def manifest_entry(self) -> dict:
        """What the cache records about the clip (everything but the video bytes)."""
        entry = asdict(self)
        entry.pop("video")
        entry["frame_indices"] = list(self.frame_indices)
        entry["group"] = self.group
        return entry


@dataclass
class Skipped:
    """A video (or one clip of it) left out of the cache, and why."""

    source: str
    """`<dataset>/<video display name>`."""
    reason: str


def check_bucket_sizes(dataset: DatasetConfig, multiple: int, config_path: str) -> None:
    """Buckets must divide into whole latent patches (and attention tiles), or the DiT cannot take them."""
    for width, height in dataset.resolutions:
        if width % multiple or height % multiple:
            raise UserError(
                f"{config_path}: dataset {dataset.name!r} resolution [{width}, {height}] is not a multiple of "
                f"{multiple} (VAE compression x patch size, x the tile the DiT's attention needs); use e.g. "
                f"[{round(width / multiple) * multiple}, {round(height / multiple) * multiple}]"
            )


def plan_clips(datasets: list[DatasetConfig], text_identity: dict, text_max_length: int, rank: int = 0,
               world: int = 1) -> tuple[list[PlannedClip], list[Skipped]]:
    """The clips of this rank's videos, in a deterministic order, plus what cannot be used and why.

    Only this rank's videos are probed; the ranks' plans together hold every clip. A video is dealt to a rank by
    its location (see `sources.iter_videos`), so every listing of one video lands on the same rank.

    A clip key met twice (a video listed twice in a manifest, a folder named by two tables) is planned once: the
    first occurrence wins and the later ones are listed as skipped, so no key is written twice, by any rank.
    """
    clips: list[PlannedClip] = []
    skipped: list[Skipped] = []
    owners: dict[str, str] = {}  # clip key -> "<dataset>/<source>" of its first occurrence, which wins
    dealt: dict[str, int] = {}  # video location -> the rank that plans it, over every dataset
    for dataset in datasets:
        # map drops each item (and the video bytes it may hold) before the next is read
        plan_video = partial(_plan_video, dataset=dataset, text_identity=text_identity, text_max_length=text_max_length)
        for source, planned in map(plan_video, iter_videos(dataset, rank, world, dealt)):
            if isinstance(planned, str):
                skipped.append(Skipped(source, planned))
                continue
            fresh = [clip for clip in planned if clip.key not in owners]
            if len(fresh) < len(planned):
                first = next(owners[clip.key] for clip in planned if clip.key in owners)
                skipped.append(Skipped(source, f"duplicate of {first}" if not fresh else
                                       f"{len(planned) - len(fresh)} of its {len(planned)} clips duplicate {first}"))
            owners.update((clip.key, source) for clip in fresh)
            clips += fresh
    return clips, skipped


def _plan_video(item: VideoItem, dataset: DatasetConfig, text_identity: dict,
                text_max_length: int) -> tuple[str, list[PlannedClip] | str]:
    """(`<dataset>/<video>`, its clips), or the reason it cannot be used in place of the clips."""
    source = f"{dataset.name}/{item.name}"
    reason = _unusable(item, dataset)
    if reason is not None:
        return source, reason
    try:
        info = _probe(item, dataset)
    except Exception as error:  # a corrupt container or image fails here; the run goes on without it
        return source, f"cannot read {dataset.medium}: {error}"
    segments = plan_segments(info, dataset)
    if not segments.segments:
        return source, segments.reason
    width, height = choose_bucket(info.width, info.height, dataset.resolutions)
    return source, [_clip(item, dataset, segment, width, height, text_identity, text_max_length)
                    for segment in segments.segments]


def _probe(item: VideoItem, dataset: DatasetConfig) -> VideoInfo:
    """What planning needs to know about the video; an image is a video of one frame without a frame rate."""
    if dataset.images:
        width, height = image_size(item.probe_source)
        return VideoInfo(num_frames=1, fps=None, width=width, height=height)
    return probe_video(item.probe_source)


def _unusable(item: VideoItem, dataset: DatasetConfig) -> str | None:
    """Why `item` cannot become clips before its video is even opened, or None."""
    if item.problem is not None:
        return item.problem
    if item.caption is None:
        return item.caption_error or "no caption"
    if not item.caption and not dataset.allow_empty_captions:
        return "empty caption; write one, or set allow_empty_captions = true to cache it for unconditional training"
    return None


def _clip(item: VideoItem, dataset: DatasetConfig, segment: Segment, width: int, height: int, text_identity: dict,
          text_max_length: int) -> PlannedClip:
    bucket = {"frames": segment.num_frames, "height": height, "width": width, "crop": dataset.crop}
    frames = {"frames": list(segment.frame_indices)} | ({"image": True} if dataset.images else {})
    return PlannedClip(
        key=clip_key(item.identity, frames, bucket),
        dataset=dataset.name, source=item.name, video=item.video, caption=item.caption,
        text_key=text_key(item.caption, text_identity, text_max_length),
        frames=segment.num_frames, height=height, width=width,
        frame_indices=tuple(segment.frame_indices), fps=segment.fps, crop=dataset.crop,
        num_repeats=dataset.num_repeats, image=dataset.images,
    )
