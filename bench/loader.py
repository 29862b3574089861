"""Training data loading: clips/s and MB/s from the Zarr cache, webdataset shards and per-clip safetensors files.

The loader must deliver well above what a training step consumes, or the GPU waits on data. This builds one
cache of random full-size Wan 2.1 clips (480x832, 81 frames: latents (16, 21, 60, 104) fp32, DINOv2-g teacher
(21, 28, 49, 1536) fp16, UMT5 text (~120, 4096) fp16, ragged) through the product's store, exports it to
webdataset shards with the product's exporter, and writes one safetensors file per clip (how other trainers
cache). It then times whole epochs of each format's loader, built as training builds it (`train.loader`),
with 0, 2 and 4 DataLoader workers at batch size 1, interleaved so that load on the machine hits all alike,
and compares the delivered rate with the rate a training step consumes clips (`--step-seconds`). Finally it
splits one clip's read latency in the main process into latents, teacher, text and tensor conversion.

Files are re-read from the page cache after the first pass: this measures decoding and copies, not the disk.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from bench.common import markdown_table, median, parser, record, time_alternating
from crepa.cache.export import export_view
from crepa.cache.keys import fingerprint
from crepa.cache.store import CacheStore, FeatureSet
from precompute.sampling import bucket_name
from train.config import TrainConfig
from train.data import BucketBatchSampler, ZarrClips, collate, to_tensors
from train.loader import build_data, loader_kwargs

FAMILY = "wan"
WORKERS = (0, 2, 4)
STEP_SECONDS = 2.5
"""Per-clip training step of Wan 2.1 1.3B at 480x832x81 on one H100 (LoRA + CREPA, batch size 1), about 2.5 s."""


@dataclass(frozen=True)
class Scale:
    """Shapes of one clip's cached arrays and how many clips the benchmark writes."""

    latents: tuple[int, int, int, int]
    """(C, F, H, W) float32."""
    teacher: tuple[int, int, int, int]
    """(F, ht, wt, D) float16."""
    text_dim: int
    text_tokens: tuple[int, int]
    """Range of the ragged caption lengths."""
    text_max_length: int
    clips: int

    @property
    def group(self) -> str:
        """The bucket of these latents: Wan compresses time by 4 (first frame alone) and space by 8."""
        _, frames, height, width = self.latents
        return bucket_name(4 * (frames - 1) + 1, 8 * height, 8 * width)

    @property
    def clips_per_shard(self) -> int:
        """Webdataset leaves workers without a shard idle, so there are at least as many shards as workers."""
        return -(-self.clips // max(WORKERS))


SCALES = {
    "full": Scale(latents=(16, 21, 60, 104), teacher=(21, 28, 49, 1536), text_dim=4096, text_tokens=(100, 140),
                  text_max_length=512, clips=12),
    "small": Scale(latents=(16, 5, 12, 20), teacher=(5, 8, 14, 384), text_dim=512, text_tokens=(10, 30),
                   text_max_length=64, clips=16),
}


@dataclass
class Corpus:
    """The same random clips in the three formats."""

    cache: str
    uncompressed: str
    """The same cache written with codec none: what zstd's decompression costs a read."""
    shards: str
    safetensors: str
    clip_bytes: float
    """Mean decoded bytes of one clip's arrays at their storage dtypes (what MB/s counts)."""
    stored_bytes: int
    """Bytes of the Zarr cache's feature arrays on disk."""


def random_clip(rng: np.random.Generator, scale: Scale) -> dict[str, np.ndarray]:
    """Random arrays of one clip at the storage dtypes; timing does not depend on values."""
    tokens = int(rng.integers(*scale.text_tokens, endpoint=True))
    return {"latents": rng.standard_normal(scale.latents, dtype=np.float32),
            "teacher": rng.standard_normal(scale.teacher, dtype=np.float32).astype(np.float16),
            "text": rng.standard_normal((tokens, scale.text_dim), dtype=np.float32).astype(np.float16)}


def feature_sets(store: CacheStore, scale: Scale) -> tuple[FeatureSet, FeatureSet, FeatureSet]:
    """Latents, teacher and text sets with the attributes the training view reads."""
    latents = store.feature_set("latents", {"family": FAMILY, "vae": "random", "dtype": "float32"},
                                {"family": FAMILY, "channels": scale.latents[0], "dtype": "float32"})
    teacher = store.feature_set("teacher", {"family": FAMILY, "encoder": "random", "dtype": "float16"},
                                {"family": FAMILY, "encoder": "dinov2_vitg14", "dim": scale.teacher[-1],
                                 "dtype": "float16"})
    text = store.feature_set("text", {"family": FAMILY, "text_encoder": "random", "dtype": "float16"},
                             {"family": FAMILY, "max_length": scale.text_max_length, "dtype": "float16"})
    return latents, teacher, text


def write_cache(path: str, scale: Scale, rng: np.random.Generator,
                codec: str = "zstd") -> dict[str, dict[str, np.ndarray]]:
    """A cache of `scale.clips` random clips with its plan, written through the product's store.

    Returns clip key -> the clip's arrays."""
    store = CacheStore.open(path, "a")
    latents_set, teacher_set, text_set = feature_sets(store, scale)
    clips, plan = {}, []
    with store.writer(latents_set, codec=codec) as latents_out, store.writer(teacher_set, codec=codec) as teacher_out, \
            store.writer(text_set, ragged=("embeds",), codec=codec) as text_out:
        for index in range(scale.clips):
            clip = random_clip(rng, scale)
            key, text_key = fingerprint({"clip": index}), fingerprint({"caption": index})
            latents_out.add(key, scale.group, {"latents": clip["latents"]})
            teacher_out.add(key, scale.group, {"patch": clip["teacher"], "cls": clip["teacher"][:, 0, 0]})
            text_out.add(text_key, "text", {"embeds": clip["text"]}, {"length": clip["text"].shape[0]})
            plan.append({"key": key, "text_key": text_key, "caption": f"clip {index}", "group": scale.group,
                         "source": f"clip{index}.mp4", "num_repeats": 1})
            clips[key] = clip
    store.write_plan("bench", {"family": FAMILY, "dataset_config": "bench.toml", "latents_set": latents_set.fingerprint,
                               "text_set": text_set.fingerprint, "clips": plan})
    return clips


def write_safetensors(folder: Path, clips: dict[str, dict[str, np.ndarray]]) -> None:
    """One file per clip, named by its clip key, holding the same arrays as the cache."""
    folder.mkdir()
    for key, arrays in clips.items():
        save_file({name: torch.from_numpy(array) for name, array in arrays.items()}, str(folder / f"{key}.st"))


def stored_bytes(cache: str) -> int:
    """Bytes of the feature arrays (manifests and plans excluded)."""
    return sum(f.stat().st_size for kind in ("latents", "teacher", "text") for f in Path(cache, kind).rglob("*")
               if f.is_file() and f.name != "zarr.json")


def build_corpus(root: Path, scale: Scale, seed: int) -> Corpus:
    """The same random clips as a Zarr cache, webdataset shards exported from it, and safetensors files."""
    cache = str(root / "cache")
    clips = write_cache(cache, scale, np.random.default_rng(seed))
    uncompressed = str(root / "cache-uncompressed")
    write_cache(uncompressed, scale, np.random.default_rng(seed), codec="none")
    export_view(cache, str(root / "shards"), family=FAMILY, maxcount=scale.clips_per_shard)
    write_safetensors(root / "safetensors", clips)
    clip_bytes = sum(a.nbytes for clip in clips.values() for a in clip.values()) / len(clips)
    return Corpus(cache, uncompressed, str(root / "shards"), str(root / "safetensors"), clip_bytes,
                  stored_bytes(cache))


class SafetensorsClips(Dataset):
    """Map-style dataset over one safetensors file per clip, returning what ZarrClips returns."""

    def __init__(self, folder: str):
        self.paths = sorted(Path(folder).glob("*.st"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        tensors = load_file(str(self.paths[index]))
        return {"key": self.paths[index].stem, "latents": tensors["latents"], "text": tensors["text"].float(),
                "teacher": tensors["teacher"]}


def train_config(cache: str, workers: int) -> TrainConfig:
    return TrainConfig(cache=cache, family=FAMILY, batch_size=1, dataloader_num_workers=workers, seed=0)


def product_epochs(cache: str, workers: int) -> Callable[[int], object]:
    """Epoch -> batch iterable of training's own loader (Zarr or webdataset, chosen by the cache path)."""
    data = build_data(train_config(cache, workers), with_teacher=True, rank=0, world=1)
    return lambda epoch: data.loader_for_epoch(epoch, 0)


def safetensors_epochs(folder: str, workers: int, text_length: int) -> Callable[[int], object]:
    """Epoch -> batch iterable over per-clip files, with training's sampler, collate and DataLoader options."""
    dataset = SafetensorsClips(folder)
    sampler = BucketBatchSampler(["all"] * len(dataset), [1] * len(dataset), batch_size=1, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate, text_length=text_length),
                        **loader_kwargs(train_config(folder, workers)))

    def epoch_loader(epoch: int):
        sampler.set_epoch(epoch)
        return loader

    return epoch_loader


class Consumer:
    """Reads every byte of a batch, as training's host-to-device copy does: to the GPU when there is one, else
    into a reusable host buffer. Without it, safetensors' memory-mapped tensors would never be read at all."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = np.empty(0, np.uint8)

    def __call__(self, batch: dict) -> int:
        """Consume the batch; returns its clip count."""
        for value in batch.values():
            if not isinstance(value, torch.Tensor):
                continue
            if self.device.type != "cpu":
                value.to(self.device, non_blocking=True)
                continue
            data = value.reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
            if self.buffer.size < data.size:
                self.buffer = np.empty(data.size, np.uint8)
            # one thread, like a DMA copy: torch's threaded copy stalls whenever another process holds a core
            np.copyto(self.buffer[: data.size], data)
        return len(batch["keys"])


def epoch_runner(epochs: Callable[[int], object], consume: Consumer) -> Callable[[], int]:
    """A call that reads and consumes one whole epoch (a new shuffle each time) and returns the clips delivered."""
    counter = iter(range(1_000_000))

    def run() -> int:
        return sum(consume(batch) for batch in epochs(next(counter)))

    return run


def throughput(corpus: Corpus, scale: Scale, rounds: int, device: torch.device) -> dict[tuple[str, int], list[float]]:
    """(format, workers) -> seconds per epoch, all variants interleaved."""
    consume = Consumer(device)
    variants = {}
    for workers in WORKERS:
        variants["zarr", workers] = epoch_runner(product_epochs(corpus.cache, workers), consume)
        variants["zarr, codec none", workers] = epoch_runner(product_epochs(corpus.uncompressed, workers), consume)
        variants["webdataset", workers] = epoch_runner(product_epochs(corpus.shards, workers), consume)
        variants["safetensors", workers] = epoch_runner(
            safetensors_epochs(corpus.safetensors, workers, scale.text_max_length), consume)
    return time_alternating(variants, rounds=rounds, warmup=1, device=device)


def read_latency(cache: str, scale: Scale) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per clip of each step of ZarrClips.__getitem__ + collate in the main process, one fresh store;
    and the mean bytes each read step returns."""
    view = ZarrClips(cache, FAMILY, None, with_teacher=True).view
    store = view.store
    times: dict[str, list[float]] = {"latents": [], "teacher": [], "text": [], "to_tensors + collate": []}
    nbytes: dict[str, list[int]] = {"latents": [], "teacher": [], "text": []}

    def timed(name: str, step: Callable, *args) -> object:
        start = time.perf_counter()
        result = step(*args)
        times[name].append(time.perf_counter() - start)
        return result

    convert = functools.partial(collate, text_length=scale.text_max_length)
    for clip in view.clips:
        for name, fset, key, array in (("latents", view.latents, clip.key, "latents"),
                                       ("teacher", view.teacher, clip.key, "patch"),
                                       ("text", view.text, clip.text_key, "embeds")):
            nbytes[name].append(timed(name, store.read, fset, key, [array])[array].nbytes)
        sample = view.load(clip)
        timed("to_tensors + collate", lambda s: convert([to_tensors(s)]), sample)
    return times, {name: float(np.mean(sizes)) for name, sizes in nbytes.items()}


def throughput_table(times: dict[tuple[str, int], list[float]], corpus: Corpus, scale: Scale,
                     step_seconds: float) -> str:
    rows = []
    for (fmt, workers), seconds in times.items():
        clips_per_s = scale.clips / median(seconds)
        rows.append([fmt, workers, f"{clips_per_s:.2f}", f"{clips_per_s * corpus.clip_bytes / 2**20:.0f}",
                     f"{clips_per_s * step_seconds:.1f}x"])
    return markdown_table(["format", "workers", "clips/s", "MB/s", "vs step consumption"], rows)


def latency_table(times: dict[str, list[float]], nbytes: dict[str, float]) -> str:
    rows = []
    for name, seconds in times.items():
        mb_per_s = f"{nbytes[name] / median(seconds) / 2**20:.0f}" if name in nbytes else "-"
        rows.append([name, f"{median(seconds) * 1e3:.2f}", f"{max(seconds) * 1e3:.2f}", mb_per_s])
    rows.append(["total", f"{sum(median(s) for s in times.values()) * 1e3:.2f}", "-", "-"])
    return markdown_table(["step (0 workers, per clip)", "median ms", "max ms", "MB/s"], rows)


def summary(times: dict[tuple[str, int], list[float]], corpus: Corpus, scale: Scale, step_seconds: float) -> str:
    rate = {variant: scale.clips / median(seconds) for variant, seconds in times.items()}
    slowest = min(rate, key=rate.get)
    best = {fmt: max(r for (f, _), r in rate.items() if f == fmt) for fmt, _ in rate}
    need = 1 / step_seconds
    verdict = "met" if rate[slowest] > 2 * need else "missed"
    return (f"A step consumes {need:.2f} clips/s ({step_seconds} s per clip); the slowest loader ({slowest[0]}, "
            f"{slowest[1]} workers) delivers {rate[slowest] / need:.1f}x that: goal (well above, >2x) {verdict}. "
            f"Best Zarr vs best webdataset: {best['zarr'] / best['webdataset']:.2f}x, vs best safetensors: "
            f"{best['zarr'] / best['safetensors']:.2f}x; Zarr without a codec vs with zstd: "
            f"{best['zarr, codec none'] / best['zarr']:.2f}x. "
            f"Zarr stores {corpus.stored_bytes / (corpus.clip_bytes * scale.clips):.2f} bytes per decoded byte: "
            "random float data does not compress, so zstd costs CPU time here but saves no bytes.")


def main() -> None:
    args = arguments()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on fewer cores is intended
    scale = SCALES[args.scale]
    root = Path(tempfile.mkdtemp(prefix="crepa-bench-loader-", dir=args.tmp))
    try:
        corpus = build_corpus(root, scale, args.seed)
        latency, read_bytes = read_latency(corpus.cache, scale)
        times = throughput(corpus, scale, args.rounds, torch.device(args.device))
    finally:
        shutil.rmtree(root)
    body = (f"{scale.clips} random clips, latents {scale.latents} fp32, teacher {scale.teacher} fp16, text "
            f"({scale.text_tokens[0]}-{scale.text_tokens[1]}, {scale.text_dim}) fp16; "
            f"{corpus.clip_bytes / 2**20:.1f} MB per clip decoded (what MB/s counts); batch size 1; every batch "
            f"copied to {args.device} as training does; median of {args.rounds} epochs; webdataset shards of "
            f"{scale.clips_per_shard} clips, so each worker gets one; files in the page cache.\n\n"
            f"{throughput_table(times, corpus, scale, args.step_seconds)}\n\n"
            f"{latency_table(latency, read_bytes)}\n\n{summary(times, corpus, scale, args.step_seconds)}")
    record(f"Data loading, {args.scale} clips", body, enabled=not args.no_record)


def arguments() -> argparse.Namespace:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full",
                   help="full: real Wan 480x832x81 clip sizes (default); small: tiny shapes for a quick run")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per variant (after one warmup epoch)")
    p.add_argument("--step-seconds", type=float, default=STEP_SECONDS,
                   help="seconds a training step takes per clip (default: Wan 2.1 1.3B, 480x832x81, one H100)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where batches go, as in training (default: cuda when there is a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="folder for the temporary cache (default: the system temp folder)")
    return p.parse_args()


if __name__ == "__main__":
    main()
