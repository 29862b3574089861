"""Images as clips of one frame: read with PIL, turned upright, in RGB, fitted to their bucket as video frames are.

Every family's VAE is causal in time, so one pixel frame encodes to one latent frame and the teacher sees that
frame: an image needs nothing a video clip does not have. Planning reads only the header (size and EXIF
orientation); the pixels are decoded in the decode workers like a video's, so a corrupt image is skipped and listed
the same way. Light imports only (PIL, NumPy): decode workers import this module to run an `ImageTask`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from precompute.decode import DecodeTask, VideoSource, fit_to_bucket, read_video

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

_ORIENTATION = 0x0112
"""EXIF tag saying how the stored pixels must be turned to stand upright (1: as stored)."""
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""Orientation -> the transpose that undoes it (the EXIF specification's table, as `ImageOps.exif_transpose`)."""
_BACKGROUND = (255, 255, 255, 255)
"""What transparent pixels are composited over: the colour stored under them is arbitrary."""


def _open(source: VideoSource) -> Image.Image:
    data = read_video(source)
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation recorded before the pixels (1 when there is none).

    Only the EXIF read with the header counts: `Image.getexif` decodes a whole PNG to look for EXIF after its
    pixels, which planning cannot afford, and planning and decoding must agree on which way up an image stands.
    """
    data = image.info.get("exif")
    if not data:
        return 1
    exif = Image.Exif()
    exif.load(data)
    return exif.get(_ORIENTATION, 1)


def image_size(source: VideoSource) -> tuple[int, int]:
    """(width, height) of the upright image, from its header alone."""
    with _open(source) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def decode_image(source: VideoSource, bucket: tuple[int, int], crop: str) -> np.ndarray:
    """The image upright, in RGB, resized into `bucket` (width, height) as video frames are: uint8 (1, H, W, 3)."""
    with _open(source) as image:
        rgb = _rgb(image)
        turn = _UPRIGHT.get(_orientation(image))
        upright = rgb if turn is None else rgb.transpose(turn)
        return np.array(fit_to_bucket(upright, bucket, crop))[None]  # writable, as torch.from_numpy wants


def _rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any mode (L, P, CMYK, RGBA, LA, ...); transparent pixels are composited over white."""
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTask(DecodeTask):
    """An image to decode into its bucket; `frame_indices` is (0,), its one frame."""

    def run(self) -> np.ndarray:
        """The decoded (1, H, W, 3) uint8 frame."""
        return decode_image(self.source, self.size, self.crop)
