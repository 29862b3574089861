"""Synthetic videos and images for the demo and the tests: real mp4, png, jpeg and webp files, no download."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_video(path: str | Path, frames: np.ndarray, fps: float, keyframe_interval: int | None = None) -> None:
    """Encode uint8 (F, H, W, 3) RGB `frames` to `path` as H.264 (MPEG-4 Part 2 when this PyAV lacks libx264),
    yuv420p. `keyframe_interval` sets the GOP length (short GOPs exercise seeking)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sides, got {width}x{height}; crop or pad by one pixel")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyframe_interval is not None:
            stream.codec_context.gop_size = keyframe_interval
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def moving_shapes_clip(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (F, H, W, 3): a few coloured discs and boxes gliding smoothly over a gradient background."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    corner_a, corner_b = rng.uniform(20, 120, 3), rng.uniform(20, 120, 3)
    mix = (xs / max(width - 1, 1) + ys / max(height - 1, 1))[..., None] / 2  # (H, W, 1) in [0, 1]
    background = (corner_a * (1 - mix) + corner_b * mix).astype(np.uint8)  # (H, W, 3)
    clip = np.broadcast_to(background, (num_frames, height, width, 3)).copy()
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None, None]  # (F, 1, 1)
    size = min(height, width)
    for shape in range(3):
        colour = rng.integers(130, 256, 3).astype(np.uint8)
        radius = rng.uniform(0.12, 0.22) * size
        start = rng.uniform(0.2, 0.8, 2) * (height, width)
        amplitude = rng.uniform(0.1, 0.3, 2) * (height, width)
        phase = rng.uniform(0, 2 * np.pi, 2)
        centre_y = start[0] + amplitude[0] * np.sin(2 * np.pi * t + phase[0])  # (F, 1, 1)
        centre_x = start[1] + amplitude[1] * np.sin(2 * np.pi * t + phase[1])
        if shape % 2:  # box
            inside = (np.abs(ys - centre_y) <= radius) & (np.abs(xs - centre_x) <= radius)
        else:  # disc
            inside = (ys - centre_y) ** 2 + (xs - centre_x) ** 2 <= radius**2
        clip[inside] = colour  # inside: (F, H, W)
    return clip


def flat_colour_clip(colours: list[tuple[int, int, int]], height: int, width: int) -> np.ndarray:
    """uint8 (len(colours), H, W, 3): frame i is filled with colours[i] (lets tests tell frames apart)."""
    palette = np.asarray(colours, dtype=np.uint8)[:, None, None, :]  # (F, 1, 1, 3)
    return np.broadcast_to(palette, (len(colours), height, width, 3)).copy()


DEMO_CAPTIONS = (
    "a red circle moving right across a dark background",
    "two blue squares sliding slowly over a light scene",
    "a yellow ball bouncing up and down",
    "three green shapes rotating in the video",
)


def write_captioned_clips(folder: Path, count: int = 4, frames: int = 17, height: int = 48, width: int = 64) -> None:
    """Short mp4 files of moving shapes, each with a sidecar caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        clip = moving_shapes_clip(frames, height, width, seed=index)
        write_video(str(folder / f"clip_{index:02d}.mp4"), clip, fps=16)
        (folder / f"clip_{index:02d}.txt").write_text(DEMO_CAPTIONS[index % len(DEMO_CAPTIONS)] + "\n")


def write_image(path: str | Path, pixels: np.ndarray, orientation: int = 1) -> None:
    """Save uint8 (H, W, 3) RGB or (H, W, 4) RGBA `pixels` with PIL in the format the file extension names.
    `orientation` other than 1 records that EXIF orientation: the pixels are stored as given, a viewer turns them."""
    options = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    Image.fromarray(pixels).save(str(path), **options)


def write_captioned_images(folder: Path, sizes: list[tuple[int, int]], extension: str = ".png") -> list[Path]:
    """One image of shapes per (width, height) in `sizes`, each with a sidecar caption; returns the image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"image_{index:02d}{extension}"
        write_image(path, moving_shapes_clip(1, height, width, seed=100 + index)[0])
        path.with_suffix(".txt").write_text(f"a still of shapes, {width}x{height}\n")
        paths.append(path)
    return paths
