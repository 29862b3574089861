"""Teacher feature storage: disk bytes and read speed per clip, and the alignment error of each lossy choice.

A clip is Wan 2.1 at 480x832, 81 frames -> 21 latent frames. For each DINOv2 encoder (s, b, l, g), image size
(224, 518, aspect resize), pooling (1, 2), storage dtype (float32, float16, bfloat16, int8 with one fp16 scale per
token) and Zarr codec (none, zstd, blosc) it writes a few clips through the product's cache store, reports the
bytes their shards take on disk and how fast fresh stores read them back (interleaved rounds; files come from
memory, so this is decoding and copying, not the disk).

Lossy dtypes are then scored as CREPA would use them: `crepa.loss.crepa_scores` (default options) of a Wan student
grid (30x52 tokens per frame, the teacher's width) against the fp32 teacher and against each lossy teacher read back
from the store, for a random student and for a student near the teacher (teacher resampled to the student grid plus
noise of equal power: a random student's scores sit near 0 and hide errors).

Teacher features come from random-weight DINOv2s of the real configs (2 layers, final layernorm) run through the
product's `TeacherEncoder` on a synthetic moving-shapes clip with pixel grain. Every latent frame is encoded: repeated
or interpolated frames hand zstd a redundancy no real clip has (int8 shrank 1.8x with 3 of 21 frames encoded and the
rest interpolated, 1.08x with all 21).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from bench.common import markdown_table, median, parser, record, time_alternating
from bench.real_configs import DINOV2, save_dinov2
from crepa.cache.quantize import dequantize_per_token, quantize_per_token
from crepa.cache.store import CODECS, CacheStore, FeatureSet
from crepa.loss import CrepaScores, crepa_scores, resample_grid
from precompute.config import TeacherSettings
from precompute.sampling import bucket_name
from precompute.synthetic import moving_shapes_clip
from precompute.teacher import TeacherEncoder, latent_frame_groups, teacher_grid

HEIGHT, WIDTH, PIXEL_FRAMES = 480, 832, 81
TEMPORAL_COMPRESSION = 4
"""Wan VAE: 81 pixel frames -> 21 latent frames."""
LATENT_FRAMES = 1 + (PIXEL_FRAMES - 1) // TEMPORAL_COMPRESSION
STUDENT_GRID = (30, 52)
"""Wan 2.1 tokens per latent frame at 480x832 (VAE /8, patch 2)."""
PATCH = 14
IMAGE_SIZES = (224, 518)
POOLS = (1, 2)
DTYPES = ("float32", "float16", "bfloat16", "int8")
LOSSY = DTYPES[1:]
STUDENTS = ("random", "near")
GRAIN = 0.02
"""Pixel noise std (in [0, 1] units) on the synthetic frames: real frames never hold bit-identical patches, while
flat synthetic regions give identical int8 tokens that zstd compresses away (1.6x instead of 1.07x without it)."""
MB = 1e6
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
"""Scratch caches live in memory when the machine allows: reads are timed from memory anyway, and the product's
fsync on commit would otherwise make the writes wait on the disk."""


@dataclass(frozen=True)
class Scale:
    clips: int
    """Clips written per variant; also the batch the scores are computed on."""
    reads: int
    """Timed rounds; each reads every clip of every variant once, from a fresh store."""


SCALES = {"quick": Scale(clips=1, reads=3), "full": Scale(clips=8, reads=5)}


@dataclass(frozen=True)
class Variant:
    """One way of storing one teacher: what the feature set's identity holds."""

    encoder: str
    image_size: int
    pool: int
    dtype: str
    codec: str

    @property
    def names(self) -> list[str]:
        return ["patch", "scale"] if self.dtype == "int8" else ["patch"]


# ---- teacher features


def latent_pixels(num_latent: int) -> torch.Tensor:
    """(L, 3, H, W) in [0, 1]: the pixel frame the teacher sees for each latent frame (`teacher_frames=stride`)."""
    pixel_frames = TEMPORAL_COMPRESSION * (num_latent - 1) + 1
    clip = moving_shapes_clip(pixel_frames, HEIGHT, WIDTH)  # (F_pix, H, W, 3) uint8
    index = [group[-1] for group in latent_frame_groups(pixel_frames, TEMPORAL_COMPRESSION)]
    frames = torch.from_numpy(clip[index]).permute(0, 3, 1, 2).float() / 255  # (L, 3, H, W)
    grain = torch.randn(frames.shape, generator=torch.Generator().manual_seed(1)) * GRAIN
    return (frames + grain).clamp(0, 1)


def pool_grid(sequence: torch.Tensor, pool: int) -> torch.Tensor:
    """(L, h, w, D) -> (L, ceil(h / pool), ceil(w / pool), D): the average pooling precompute applies."""
    if pool == 1:
        return sequence
    return F.avg_pool2d(sequence.permute(0, 3, 1, 2), pool, ceil_mode=True).permute(0, 2, 3, 1)


def clip_windows(sequence: torch.Tensor, clips: int) -> np.ndarray:
    """(clips, 21, h, w, D) fp32: overlapping 21-frame windows of the sequence, one per clip."""
    return np.stack([sequence[c : c + LATENT_FRAMES].contiguous().numpy() for c in range(clips)])


# ---- storage dtypes


def to_stored(features: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """fp32 (F, h, w, D) -> the arrays one cache entry holds in this storage dtype."""
    if dtype == "int8":
        steps, scale = quantize_per_token(features)
        return {"patch": steps, "scale": scale}
    if dtype == "bfloat16":
        # zarr has no bfloat16 data type: the entry keeps bf16's bit patterns (round to nearest even) as uint16
        return {"patch": torch.from_numpy(features).bfloat16().view(torch.int16).numpy().view(np.uint16)}
    return {"patch": features.astype(dtype)}


def from_stored(arrays: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """The arrays of one entry -> fp32 (F, h, w, D), as a trainer would use them."""
    if dtype == "int8":
        return dequantize_per_token(arrays["patch"], arrays["scale"])
    if dtype == "bfloat16":
        return torch.from_numpy(arrays["patch"].view(np.int16)).view(torch.bfloat16).float().numpy()
    return arrays["patch"].astype(np.float32)


# ---- the product's store


def write_variant(root: str, variant: Variant, entries: list[dict[str, np.ndarray]]) -> FeatureSet:
    """Write the entries as clip0, clip1 ... of the variant's own teacher feature set."""
    store = CacheStore.open(root, "a")
    fset = store.feature_set("teacher", asdict(variant), {"source": "bench.storage"})
    group = bucket_name(PIXEL_FRAMES, HEIGHT, WIDTH)
    with store.writer(fset, codec=variant.codec, writer_id="bench") as writer:
        for index, arrays in enumerate(entries):
            writer.add(f"clip{index}", group, arrays)
    return fset


def disk_bytes(root: str, fset: FeatureSet) -> tuple[int, int]:
    """(shard bytes, metadata bytes): the set's array data, and its zarr.json files plus manifests."""
    data = meta = 0
    for folder in (Path(root) / fset.path, Path(root) / "manifest" / fset.path):
        for path in folder.rglob("*"):
            if path.is_file():
                if path.name.endswith(".json"):
                    meta += path.stat().st_size
                else:
                    data += path.stat().st_size
    return data, meta


def reader(root: str, fset: FeatureSet, names: list[str], clips: int, stores: int) -> Callable[[], int]:
    """A call that reads every clip from a store not used before (manifest loaded, no arrays opened yet)."""
    fresh = []
    for _ in range(stores):
        store = CacheStore.open(root)
        store.keys(fset)  # loads the manifest outside the timed call
        fresh.append(store)

    def read() -> int:
        store = fresh.pop()
        return sum(a.nbytes for c in range(clips) for a in store.read(fset, f"clip{c}", names).values())

    return read


def read_back(root: str, fset: FeatureSet, variant: Variant, clips: int) -> np.ndarray:
    """(clips, F, h, w, D) fp32 as decoded from the store."""
    store = CacheStore.open(root)
    return np.stack([from_stored(store.read(fset, f"clip{c}", variant.names), variant.dtype) for c in range(clips)])


# ---- errors


def peak_to_rms(features: torch.Tensor) -> float:
    """Mean over tokens of max |x| / RMS(x) over channels."""
    return (features.abs().amax(-1) / features.pow(2).mean(-1).sqrt()).mean().item()


def token_cosine(reference: torch.Tensor, lossy: torch.Tensor) -> float:
    """Mean cosine of matching tokens; via |a - b|^2 / 2 of unit vectors, exact near 1 in fp32."""
    half_squared = (F.normalize(reference, dim=-1) - F.normalize(lossy, dim=-1)).pow(2).sum(-1) / 2
    return 1.0 - half_squared.double().mean().item()


def students(teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, F, 30, 52, D) students: random, and the teacher resampled to the student grid plus equal-power noise."""
    generator = torch.Generator().manual_seed(0)
    shape = (*teacher.shape[:2], *STUDENT_GRID, teacher.shape[-1])
    noise = torch.randn(shape, generator=generator).to(teacher.device)
    near = resample_grid(teacher, STUDENT_GRID)
    return dict(zip(STUDENTS, (noise, near + noise * near.std()), strict=True))


def score_deltas(student: torch.Tensor, want: CrepaScores, lossy: torch.Tensor) -> tuple[float, float, float]:
    """(max |delta per_video|, |delta alignment_score|, fp32 alignment_score): `want` is the fp32 teacher's."""
    got = crepa_scores(student, lossy)
    return ((got.per_video - want.per_video).abs().max().item(),
            (got.alignment_score - want.alignment_score).abs().item(), want.alignment_score.item())


# ---- one (encoder, image size, pool) group


@dataclass
class Figures:
    """What one storage dtype of one (encoder, image size, pool) measured, codecs side by side."""

    encoder: str
    image_size: int
    pool: int
    dtype: str
    grid: tuple[int, int]
    raw_mb: float
    """Array bytes per clip as stored (int8 includes its scales)."""
    disk_mb: dict[str, float]
    """codec -> shard bytes per clip on disk."""
    meta_kb: float
    """zarr.json files and manifests per clip, averaged over codecs."""
    clips_per_s: dict[str, float]
    read_mb_per_s: dict[str, float]
    """Decoded arrays as stored, per second."""
    cosine: float | None = None
    """Mean token cosine of the lossy features read back against fp32 (None for fp32)."""
    peak_to_rms: float = 0.0
    """Mean over tokens of max |x| / RMS(x) of the fp32 features: int8's error grows with its square."""
    deltas: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """student -> (max |delta per_video|, |delta alignment_score|, fp32 alignment_score)."""


def time_reads(root: str, sets: dict[Variant, FeatureSet], scale: Scale) -> dict[Variant, tuple[float, int]]:
    """Variant -> (median seconds to read every clip, decoded bytes), all variants interleaved."""
    readers = {v: reader(root, fset, v.names, scale.clips, scale.reads + 1) for v, fset in sets.items()}
    decoded = {v: read() for v, read in readers.items()}  # the untimed first pass
    seconds = time_alternating(readers, rounds=scale.reads, warmup=0)
    return {v: (median(seconds[v]), decoded[v]) for v in sets}


def storage_figures(root: str, sets: dict[Variant, FeatureSet], reads: dict[Variant, tuple[float, int]],
                    features: np.ndarray, stored: list[dict[str, np.ndarray]], dtype: str) -> Figures:
    """Bytes on disk and read speed of one dtype in every codec."""
    clips = len(features)
    variants = {v.codec: v for v in sets if v.dtype == dtype}
    on_disk = {c: disk_bytes(root, sets[v]) for c, v in variants.items()}
    first = next(iter(variants.values()))
    return Figures(
        first.encoder, first.image_size, first.pool, dtype, tuple(features.shape[2:4]),
        raw_mb=sum(a.nbytes for a in stored[0].values()) / MB,
        disk_mb={c: on_disk[c][0] / clips / MB for c in CODECS},
        meta_kb=sum(on_disk[c][1] for c in CODECS) / len(CODECS) / clips / 1e3,
        clips_per_s={c: clips / reads[v][0] for c, v in variants.items()},
        read_mb_per_s={c: reads[v][1] / reads[v][0] / MB for c, v in variants.items()},
    )


def add_errors(figures: list[Figures], root: str, sets: dict[Variant, FeatureSet], reference: torch.Tensor) -> None:
    """Token cosine and score deltas of each lossy dtype, read back from its zstd set, against the fp32 reference."""
    scored = {name: (student, crepa_scores(student, reference)) for name, student in students(reference).items()}
    ratio = peak_to_rms(reference)
    for figure in figures:
        figure.peak_to_rms = ratio
        variant = Variant(figure.encoder, figure.image_size, figure.pool, figure.dtype, "zstd")
        lossy = torch.from_numpy(read_back(root, sets[variant], variant, len(reference))).to(reference.device)
        figure.cosine = token_cosine(reference, lossy)
        figure.deltas = {name: score_deltas(student, want, lossy) for name, (student, want) in scored.items()}


def measure_group(encoder: str, image_size: int, pool: int, features: np.ndarray, scale: Scale,
                  device: torch.device) -> list[Figures]:
    """Write every dtype x codec of one teacher to a scratch cache, time its reads, score its lossy dtypes."""
    root = tempfile.mkdtemp(prefix="crepa-storage-", dir=SCRATCH)
    try:
        stored = {d: [to_stored(clip, d) for clip in features] for d in DTYPES}
        variants = [Variant(encoder, image_size, pool, d, c) for d, c in itertools.product(DTYPES, CODECS)]
        sets = {v: write_variant(root, v, stored[v.dtype]) for v in variants}
        reads = time_reads(root, sets, scale)
        figures = [storage_figures(root, sets, reads, features, stored[d], d) for d in DTYPES]
        add_errors([f for f in figures if f.dtype in LOSSY], root, sets, torch.from_numpy(features).to(device))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def encoder_groups(encoder: str, scale: Scale, pixels: torch.Tensor, device: torch.device,
                   image_sizes: list[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(image_size, pool, features (clips, F, h, w, D) fp32) of one random-weight encoder, through TeacherEncoder."""
    with tempfile.TemporaryDirectory(prefix="crepa-dinov2-") as folder:
        save_dinov2(folder, encoder, layers=2)
        for image_size in image_sizes:
            teacher = TeacherEncoder(TeacherSettings(encoder=folder, image_size=image_size), device, torch.float32)
            sequence = teacher.frame_features(pixels.to(device))[0].cpu()  # (L, h, w, D)
            for pool in POOLS:
                pooled = pool_grid(sequence, pool)
                expected = teacher_grid(HEIGHT, WIDTH, TeacherSettings(image_size=image_size, pool=pool), PATCH)
                if tuple(pooled.shape[1:3]) != expected:
                    raise RuntimeError(f"teacher grid {tuple(pooled.shape[1:3])} differs from precompute's {expected}")
                yield image_size, pool, clip_windows(pooled, scale.clips)


# ---- output


def storage_table(figures: list[Figures]) -> str:
    codecs = " / ".join(CODECS)
    rows = [[f.encoder, f.image_size, f.pool, f"{f.grid[0]}x{f.grid[1]}", f.dtype, f"{f.raw_mb:.2f}",
             *(f"{f.disk_mb[c]:.2f} ({f.raw_mb / f.disk_mb[c]:.2f}x)" for c in CODECS),
             " / ".join(f"{f.clips_per_s[c]:.1f}" for c in CODECS),
             " / ".join(f"{f.read_mb_per_s[c]:.0f}" for c in CODECS), f"{f.meta_kb:.1f}"] for f in figures]
    headers = ["encoder", "px", "pool", "grid", "dtype", "arrays MB/clip", *(f"{c} MB/clip (ratio)" for c in CODECS),
               f"read clips/s {codecs}", f"read MB/s {codecs}", "metadata kB/clip"]
    return markdown_table(headers, rows)


def error_table(figures: list[Figures]) -> str:
    rows = [[f.encoder, f.image_size, f.pool, f.dtype, f"{f.peak_to_rms:.2f}", f"{f.cosine:.7f}", f"{1 - f.cosine:.2e}",
             *(f"{f.deltas[s][0]:.2e}" for s in STUDENTS), *(f"{f.deltas[s][1]:.2e}" for s in STUDENTS),
             f"{f.deltas['near'][2]:.3f}"] for f in figures if f.cosine is not None]
    headers = ["encoder", "px", "pool", "dtype", "token peak/RMS", "mean token cos", "1 - cos",
               *(f"max abs d per_video ({s})" for s in STUDENTS), *(f"abs d alignment ({s})" for s in STUDENTS),
               "alignment (near)"]
    return markdown_table(headers, rows)


def summary(figures: list[Figures]) -> str:
    """Three computed sentences: bytes of the largest clip, the codecs' ratios, the worst lossy errors."""
    by = {(f.encoder, f.image_size, f.pool, f.dtype): f for f in figures}
    heavy = max({k[:3] for k in by}, key=lambda k: by[(*k, "float32")].raw_mb)
    fp16, int8 = by[(*heavy, "float16")], by[(*heavy, "int8")]
    lines = [f"Largest clip ({heavy[0]}, {heavy[1]} px, pool {heavy[2]}): fp16 takes {fp16.disk_mb['zstd']:.1f} MB "
             f"with zstd, int8 {int8.disk_mb['zstd']:.1f} MB ({fp16.disk_mb['zstd'] / int8.disk_mb['zstd']:.2f}x "
             "less)."]
    parts = []
    for dtype in DTYPES:
        rows = [f for f in figures if f.dtype == dtype]
        size = {c: median([f.disk_mb["none"] / f.disk_mb[c] for f in rows]) for c in CODECS}
        speed = {c: median([f.clips_per_s[c] / f.clips_per_s["none"] for f in rows]) for c in CODECS}
        parts.append(f"{dtype} zstd {size['zstd']:.2f}x smaller at {speed['zstd']:.2f}x the read speed, "
                     f"blosc {size['blosc']:.2f}x at {speed['blosc']:.2f}x")
    lines.append("Codecs against none (median over encoders, sizes, pools): " + "; ".join(parts) + ".")
    parts = []
    for dtype in LOSSY:
        rows = [f for f in figures if f.dtype == dtype]
        parts.append(f"{dtype} worst 1 - cos {max(1 - f.cosine for f in rows):.1e}, max |d per_video| "
                     f"{max(f.deltas['near'][0] for f in rows):.1e} (near student, score "
                     f"~{median([f.deltas['near'][2] for f in rows]):.2f}) / "
                     f"{max(f.deltas['random'][0] for f in rows):.1e} (random)")
    worst = max((f for f in figures if f.dtype == "int8"), key=lambda f: 1 - f.cosine)
    predicted = worst.peak_to_rms**2 / (24 * 127**2)  # rounding noise step^2 / 12 per channel, step = peak / 127
    lines.append("Against the fp32 teacher: " + "; ".join(parts) + f". int8's 1 - cos follows (peak/RMS)^2 / "
                 f"(24 * 127^2): {predicted:.1e} predicted at peak/RMS {worst.peak_to_rms:.2f}, {1 - worst.cosine:.1e} "
                 "measured; scale it by the square of real features' peak/RMS over this one.")
    return "\n".join(lines)


def main() -> None:
    args = build_parser().parse_args()
    scale = SCALES[args.scale]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transformers.utils.logging.disable_progress_bar()
    pixels = latent_pixels(LATENT_FRAMES + scale.clips - 1)  # (L, 3, H, W): one 21-frame window per clip
    figures = []
    for encoder in args.encoders:
        for image_size, pool, features in encoder_groups(encoder, scale, pixels, device, args.image_sizes):
            print(f"{encoder} {image_size} px pool {pool}: teacher {features.shape}", flush=True)
            figures += measure_group(encoder, image_size, pool, features, scale, device)
    body = (f"Scale `{args.scale}` ({asdict(scale)}): Wan 480x832x81 clips ({LATENT_FRAMES} latent frames), "
            f"clips per variant: {scale.clips}, MB = 10^6 bytes. Bytes for `none` are exact; zstd/blosc ratios come "
            "from random-weight DINOv2 features (2 layers, final layernorm) of a synthetic clip and only stand in "
            "for real ones. bfloat16 is stored as its uint16 bit patterns (zarr has no bfloat16 type): bytes and "
            "error are bf16's. int8 holds int8 steps plus one fp16 scale per token. Reads come from memory (decoding "
            "and copies, not the disk) and each timed read also opens its segments' arrays (a few ms, which only "
            "the smallest entries notice when a segment holds one clip); read MB/s counts the arrays as stored.\n\n"
            f"{storage_table(figures)}\n\n"
            "Error against the fp32 teacher, features read back from the zstd sets; `crepa_scores` with default "
            f"options; students {STUDENT_GRID[0]}x{STUDENT_GRID[1]} tokens per frame: `random`, or `near` (the "
            "teacher resampled plus equal-power noise; `alignment (near)` is its fp32 score). int8's error grows "
            "with the square of a token's peak-to-RMS ratio: real DINOv2 tokens with outlier channels lose more "
            "than these random-weight ones.\n\n"
            f"{error_table(figures)}\n\n{summary(figures)}\n")
    record("Teacher storage: bytes, read speed and CREPA error per dtype, pool and codec", body,
           enabled=not args.no_record)


def build_parser() -> argparse.ArgumentParser:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--scale", choices=sorted(SCALES), default="quick",
                           help="quick: 1 clip per variant, 3 timed reads (CPU); full: 8 clips, 5 reads (GPU machine)")
    arguments.add_argument("--encoders", nargs="+", choices=list(DINOV2), default=list(DINOV2))
    arguments.add_argument("--image-sizes", nargs="+", type=int, default=list(IMAGE_SIZES))
    return arguments


if __name__ == "__main__":
    main()
