"""`run_precompute`: clips -> cache, as a chain of small stages.

    this rank's slice of the videos -> its plan (probed, written as its part) -> what is missing
      -> text stage: unique captions, the empty prompt and validation prompts -> text encoder -> text set
      -> video stage: decode pool (CPU workers) -> VAE -> latents set
                                              |-> DINOv2 -> teacher set
                                              \\-> first frame -> VAE (+ image encoder) -> condition set
                                                   (image-to-video models only)
Each stage only loads the models it needs, once. The decode workers start before the text stage, so
decoding runs behind it and behind model loading; segment writes (compression, checksums, disk) run
on a background thread, so the main loop only feeds the models. Writes are committed per segment, so
a rerun after any crash computes only what is not committed yet.

Ranks deal out the videos (precompute.sources) and each plans only its own: probing a video in a tar shard or a
dataset row needs its bytes, so no rank reads another's. Each rank writes its own part of the plan; the training
view reads every plan, so the parts together list every clip. Plans and decode tasks hold references to such
videos, not their bytes, which are read in the decode worker: memory holds only the clips in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crepa.cache.keys import text_key
from crepa.cache.quantize import quantize_per_token
from crepa.cache.store import CacheStore, FeatureSet, SegmentWriter
from crepa.encoders import resolve_encoder
from crepa.families import FamilyAdapter, get_family
from crepa.families.base import ImageConditioning, ImageEncoders, spatial_patch
from crepa.families.loading import load_config, resolve_dtype
from crepa.prompts import EMPTY_PROMPT, read_prompts
from precompute.config import PrecomputeConfig
from precompute.dataset_config import DatasetConfig, load_dataset_config
from precompute.decode import DecodePool, DecodeResult
from precompute.feature_sets import RunFeatureSets, open_feature_sets
from precompute.models import (
    Timer,
    compute_dtype,
    load_image_encoders,
    load_text_encoders,
    load_vae,
    precompute_device,
    resident,
)
from precompute.output import disk_full, is_disk_full, open_output
from precompute.plan import PlannedClip, Skipped, check_bucket_sizes, plan_clips
from precompute.teacher import TeacherEncoder, teacher_grid
from precompute.writing import BackgroundWriter

log = logging.getLogger("crepa.precompute")


@dataclass
class PrecomputeSummary:
    """What a run did, for the end-of-run table and the report stored in the cache."""

    planned: int = 0
    planned_images: int = 0
    """How many of the planned clips are images (clips of one frame)."""
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    forward_seconds: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    estimated_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        """Share of the wall time spent in model forwards (decode and writes hidden behind them).

        Model loading is left out of the wall time: it is paid once per run, however many clips follow.
        """
        busy = self.wall_seconds - sum(self.load_seconds.values())
        return sum(self.forward_seconds.values()) / busy if busy > 0 else 0.0


def distributed_slice() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class Timers:
    """Model forwards (the efficiency's numerator) and model loading (left out of its denominator)."""

    forward: Timer = field(default_factory=Timer)
    load: Timer = field(default_factory=Timer)


def _clip_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


def _to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast on the device, then copy: half the bytes cross to the host for float16, and the host does no cast."""
    return tensor.detach().to(resolve_dtype(dtype)).cpu().numpy()


def _estimate_bytes(clips: list[PlannedClip], todo: dict[str, set[str]], adapter: FamilyAdapter, vae_config: dict,
                    config: PrecomputeConfig, encoder_config: dict | None,
                    conditioning: ImageConditioning | None) -> dict[str, int]:
    """Uncompressed bytes the missing latents, teacher and condition entries will take, for --dry-run (condition:
    its latents; image embeddings, under a MB a clip, are left out)."""
    _, spatial = adapter.vae_compression(vae_config)
    channels = vae_config.get("z_dim", vae_config.get("latent_channels", 16))
    condition_channels = conditioning.condition_channels if conditioning is not None else 0
    estimate = {"latents": 0, "teacher": 0, "condition": 0}
    for clip in clips:
        frames = adapter.latent_frames(clip.frames, vae_config)
        latent_values = frames * (clip.height // spatial) * (clip.width // spatial)
        if clip.key in todo["latents"]:
            estimate["latents"] += channels * latent_values * np.dtype(config.latents_dtype).itemsize
        if clip.key in todo["condition"]:
            estimate["condition"] += condition_channels * latent_values * np.dtype(config.latents_dtype).itemsize
        if clip.key in todo["teacher"]:
            height, width = teacher_grid(clip.height, clip.width, config.teacher, encoder_config["patch_size"])
            dim, storage = encoder_config["hidden_size"], np.dtype(config.teacher.dtype).itemsize
            scale = 2 if config.teacher.dtype == "int8" else 0  # an fp16 scale per token
            cls = np.dtype(_host_dtype(config.teacher.dtype)).itemsize
            estimate["teacher"] += frames * (height * width * (dim * storage + scale) + dim * cls)
    return estimate


def run_precompute(config: PrecomputeConfig) -> PrecomputeSummary:
    """Fill the cache at `config.out` with everything the dataset config asks for that is not there yet."""
    start = time.perf_counter()
    adapter = get_family(config.family)
    rank, world = distributed_slice()
    device = precompute_device(config.device)
    dtypes = {name: str(compute_dtype(getattr(config, f"{name}_dtype"), device)).removeprefix("torch.")
              for name in ("vae", "encoder", "text_encoder", "image_encoder")}

    # Configs only: the plan is made before any weights are loaded.
    vae_config = load_config(adapter.vae_class(), config.model, "vae", config.vae)
    temporal, spatial = adapter.vae_compression(vae_config)
    transformer_config = _transformer_config(adapter, config)
    # a bucket's sides tile into whole patches, and the token grid into what the transformer's attention needs
    side_multiple = spatial
    if transformer_config:
        side_multiple *= spatial_patch(transformer_config) * adapter.token_multiple(transformer_config)
    conditioning = adapter.image_conditioning(transformer_config, vae_config) if transformer_config else None
    dataset_file = load_dataset_config(config.dataset_config, temporal)
    for dataset in dataset_file.datasets:
        check_bucket_sizes(dataset, side_multiple, config.dataset_config)
    encoder_config = None if config.skip_teacher else _encoder_config(config)
    max_length = config.text_max_length or adapter.default_text_max_length
    prompts = [EMPTY_PROMPT, *(read_prompts(config.validation_prompts) if config.validation_prompts else [])]

    store = open_output(config.out, dry_run=config.dry_run)
    sets = open_feature_sets(store, adapter, config, dtypes, vae_config, max_length, encoder_config, conditioning)
    # Each rank plans (and probes) only its own videos, and writes its own part of the plan.
    mine, skipped = plan_clips(dataset_file.datasets, sets.text.attrs["identity"], max_length, rank, world)
    if not config.dry_run:
        _write_plan(store, config.dataset_config, {
            "family": adapter.name,
            "dataset_config": os.path.abspath(config.dataset_config),
            "datasets": [_resolved(dataset) for dataset in dataset_file.datasets],
            "latents_set": sets.latents.fingerprint,
            "text_set": sets.text.fingerprint,
            "condition_set": sets.condition.fingerprint if sets.condition is not None else None,
        }, [clip.manifest_entry() for clip in mine], rank, world)

    # A caption shared by clips of two ranks is encoded by both; the store keeps one entry per key. The prompts
    # are captions of no clip, encoded by rank 0 even when it plans no clip.
    my_captions = {clip.text_key: clip.caption for clip in mine}
    if rank == 0:
        my_captions |= {text_key(prompt, sets.text.attrs["identity"], max_length): prompt for prompt in prompts}
    my_captions = dict(sorted(my_captions.items()))
    todo = _missing(store, sets, mine, my_captions, config.regenerate)
    summary = PrecomputeSummary(planned=len(mine), planned_images=sum(clip.image for clip in mine), skipped=skipped)
    summary.computed = {kind: len(keys) for kind, keys in todo.items()
                        if kind != "condition" or sets.condition is not None}
    summary.reused = {"latents": len(mine) - len(todo["latents"]), "text": len(my_captions) - len(todo["text"]),
                      "teacher": 0 if sets.teacher is None else len(mine) - len(todo["teacher"])}
    if sets.condition is not None:  # image-to-video models only
        summary.reused["condition"] = len(mine) - len(todo["condition"])
    video_clips = [clip for clip in mine if any(clip.key in todo[kind] for kind in ("latents", "teacher", "condition"))]
    if config.dry_run:
        summary.estimated_bytes = _estimate_bytes(mine, todo, adapter, vae_config, config, encoder_config,
                                                  conditioning)
        summary.wall_seconds = time.perf_counter() - start
        return summary

    timers = Timers()
    tasks = [clip.decode_task(i) for i, clip in enumerate(video_clips)]
    try:
        with DecodePool(config.decode_workers, config.decode_timeout) as pool:
            decoded = pool.map(tasks)  # workers start decoding now, behind the text stage and the model loading
            if todo["text"]:
                _text_stage(adapter, config, device, store, sets.text,
                            {k: my_captions[k] for k in sorted(todo["text"])}, max_length, timers)
            if video_clips:
                skipped, computed = _video_stage(adapter, config, device, store, sets, video_clips, decoded, todo,
                                                 vae_config, conditioning, timers)
                summary.skipped += skipped
                summary.computed.update(computed)
    except OSError as error:
        if not is_disk_full(error):
            raise
        store.refresh()  # what is committed now; the rest is still to write
        left = _estimate_bytes(mine, _missing(store, sets, mine, my_captions, False), adapter, vae_config, config,
                               encoder_config, conditioning)
        raise disk_full(config.out, sum(left.values())) from error
    summary.forward_seconds = timers.forward.seconds
    summary.load_seconds = timers.load.seconds
    summary.wall_seconds = time.perf_counter() - start
    store.write_report(f"precompute-{time.strftime('%Y%m%d-%H%M%S')}-rank{rank}", {
        "config": asdict(config), "planned": summary.planned, "planned_images": summary.planned_images,
        "computed": summary.computed, "reused": summary.reused, "skipped": [asdict(s) for s in summary.skipped],
        "forward_seconds": summary.forward_seconds, "load_seconds": summary.load_seconds,
        "wall_seconds": summary.wall_seconds,
    })
    return summary


def _resolved(dataset: DatasetConfig) -> dict:
    """A dataset table as resolved (absolute paths, defaults filled), without where it was written."""
    table = asdict(dataset)
    table.pop("origin")
    return table


def _write_plan(store: CacheStore, dataset_config: str, header: dict, clips: list[dict], rank: int,
                world: int) -> None:
    """Store this rank's part of the plan as `<config stem>-<hash of header>[-part<rank>of<world>]`.

    The hash covers the resolved datasets, family and feature sets, so two configs that share a file name (every
    folder's dataset.toml) get two plans and training sees the clips of both; a rerun of one config rewrites its
    own plan, and an edited config replaces the plans it made before with the same family and feature sets (rank 0
    removes them), so clips it dropped leave training too; its plans for other models stay. Training reads every
    plan, so the parts of all ranks together list every clip.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(dataset_config))[0])
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{readable}-{digest}" + (f"-part{rank}of{world}" if world > 1 else "")
    store.write_plan(name, {"name": readable, "content_hash": digest, **header, "clips": clips})
    if rank != 0:
        return
    same_run = ("dataset_config", "family", "latents_set", "text_set", "condition_set")
    for other, plan in store.plans().items():
        if all(plan.get(field) == header[field] for field in same_run) and plan.get("content_hash") != digest:
            store.remove_plan(other)


def _transformer_config(adapter: FamilyAdapter, config: PrecomputeConfig) -> dict | None:
    """The family's DiT config when the pipeline folder has one: its patch size and image conditioning."""
    try:
        return load_config(adapter.transformer_class(), config.model, "transformer")
    except OSError:
        return None


def _encoder_config(config: PrecomputeConfig) -> dict:
    from transformers import AutoConfig

    from crepa.families.loading import load_pretrained

    return load_pretrained(AutoConfig, None, "encoder", resolve_encoder(config.teacher.encoder)).to_dict()


def _missing(store: CacheStore, sets: RunFeatureSets, clips: list[PlannedClip], captions: dict[str, str],
             regenerate: bool) -> dict[str, set[str]]:
    """Keys of this rank's entries that are not committed yet (all of them with --regenerate)."""
    def todo(fs: FeatureSet | None, wanted: set[str]) -> set[str]:
        if fs is None:
            return set()
        return set(wanted) if regenerate else wanted - store.keys(fs)

    clip_keys = {clip.key for clip in clips}
    return {"latents": todo(sets.latents, clip_keys), "teacher": todo(sets.teacher, clip_keys),
            "condition": todo(sets.condition, clip_keys), "text": todo(sets.text, set(captions))}


def _writer(store: CacheStore, feature_set: FeatureSet, config: PrecomputeConfig, **options) -> SegmentWriter:
    """A segment writer bounded by the run's segment size and clip count."""
    return store.writer(feature_set, max_segment_bytes=config.max_segment_mb * 2**20,
                        max_segment_entries=config.segment_clips, codec=config.codec, **options)


def _text_stage(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device, store: CacheStore,
                text_set: FeatureSet, captions: dict[str, str], max_length: int, timers: Timers) -> None:
    """Unique captions -> the family's text arrays; the text encoders are freed before the video stage."""
    with timers.load("text_encoder", device):
        encoders = load_text_encoders(adapter, config, device)
    items = list(captions.items())
    with _writer(store, text_set, config, ragged=("embeds",)) as writer, BackgroundWriter({"text": writer}) as out, \
            tqdm(total=len(items), desc="text", unit="caption") as bar:
        for begin in range(0, len(items), config.text_batch_size):
            batch = items[begin: begin + config.text_batch_size]
            with torch.no_grad(), contextlib.ExitStack() as on_device, timers.forward("text_encoder", device):
                for name in adapter.text_encoder_classes:
                    on_device.enter_context(resident(encoders[name], device, config.offload))
                encoded = adapter.encode_text(encoders, [caption for _, caption in batch], max_length)
            for (key, caption), arrays in zip(batch, encoded, strict=True):
                stored = {name: _to_numpy(array, config.text_dtype) for name, array in arrays.items()}
                out.add("text", key, "text", stored, {"caption": caption, "length": int(arrays["embeds"].shape[0])})
            bar.update(len(batch))
    del encoders
    _free(device)


@dataclass
class _VideoModels:
    """What the video stage runs; each model is None when no clip needs it."""

    vae: nn.Module | None
    teacher: TeacherEncoder | None
    temporal: int
    """The VAE's temporal compression: pixel frames per latent frame."""
    conditioning: ImageConditioning | None = None
    """How the image-to-video model is conditioned on the first frame; None when no clip needs its condition."""
    image_encoders: ImageEncoders | None = None
    """The pipeline's image encoder and processor, when the conditioning takes image embeddings."""


def _load_video_models(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device, sets: RunFeatureSets,
                       todo: dict[str, set[str]], vae_config: dict, conditioning: ImageConditioning | None,
                       timers: Timers) -> _VideoModels:
    temporal, _ = adapter.vae_compression(vae_config)
    models = _VideoModels(vae=None, teacher=None, temporal=temporal)
    if todo["condition"]:
        models.conditioning = conditioning
        if conditioning.image_embeds:
            with timers.load("image_encoder", device):
                models.image_encoders = load_image_encoders(adapter, config, device)
    if todo["latents"] or config.teacher.input == "reconstruction" or todo["condition"]:
        with timers.load("vae", device):
            models.vae = load_vae(adapter, config, device)
    if sets.teacher is not None and todo["teacher"]:
        with timers.load("encoder", device):
            models.teacher = TeacherEncoder(config.teacher, device, compute_dtype(config.encoder_dtype, device),
                                            config.encoder_batch_size)
    return models


def _video_stage(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device, store: CacheStore,
                 sets: RunFeatureSets, clips: list[PlannedClip], decoded: Iterator[DecodeResult],
                 todo: dict[str, set[str]], vae_config: dict, conditioning: ImageConditioning | None,
                 timers: Timers) -> tuple[list[Skipped], dict[str, int]]:
    """Decoded clips (`decoded` yields results whose task ids index `clips`) -> latents, teacher features and
    image-to-video conditions.

    Decoding runs ahead in worker processes and segment writes run on a background thread, so this loop only
    moves frames to the device, runs the models and copies their outputs back. Returns the clips that could not
    be decoded and how many entries of each kind were written.
    """
    models = _load_video_models(adapter, config, device, sets, todo, vae_config, conditioning, timers)
    skipped: list[Skipped] = []
    with contextlib.ExitStack() as stack:
        writers = {"latents": stack.enter_context(_writer(store, sets.latents, config))}
        if models.teacher is not None:
            writers["teacher"] = stack.enter_context(_writer(store, sets.teacher, config))
        if models.conditioning is not None:
            writers["condition"] = stack.enter_context(_writer(store, sets.condition, config))
        computed = {"teacher": 0} | dict.fromkeys(writers, 0)  # latents and teacher always reported
        prepare = {"teacher": _quantize_patch} if config.teacher.dtype == "int8" else {}
        # innermost: stopped before the writers drop buffers
        out = stack.enter_context(BackgroundWriter(writers, prepare=prepare))
        bar = stack.enter_context(tqdm(total=len(clips), desc="clips", unit="clip"))
        for result in decoded:
            clip = clips[result.task_id]
            bar.update(1)
            if not result.ok:
                if config.strict:
                    raise RuntimeError(f"{clip.source}: {result.error} (rerun without --strict to skip bad clips)")
                skipped.append(Skipped(f"{clip.dataset}/{clip.source}", result.error))
                bar.set_postfix(skipped=len(skipped))
                continue
            arrays = _encode_clip(adapter, config, device, models, clip, result.frames, todo, timers)
            meta = {"source": clip.source, "caption": clip.caption, "text_key": clip.text_key, "fps": clip.fps}
            for kind, entry in arrays.items():
                out.add(kind, clip.key, clip.group, entry, meta)
                computed[kind] += 1
    return skipped, computed


def _encode_clip(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device, models: _VideoModels,
                 clip: PlannedClip, rgb: np.ndarray, todo: dict[str, set[str]],
                 timers: Timers) -> dict[str, dict[str, np.ndarray]]:
    """One decoded clip -> the arrays of each kind it still needs: {"latents": {...}, "teacher": {...}, ...}."""
    frames = torch.from_numpy(rgb).to(device)  # (F, H, W, 3) uint8: a quarter of float32's bytes to move
    wants_teacher = models.teacher is not None and clip.key in todo["teacher"]
    reconstruct = config.teacher.input == "reconstruction"
    arrays = {}
    latents = None
    if clip.key in todo["latents"] or (wants_teacher and reconstruct):
        latents = _encode_latents(adapter, config, device, models.vae, clip.key, frames, timers)
    if clip.key in todo["latents"]:
        arrays["latents"] = {"latents": _to_numpy(latents[0], config.latents_dtype)}
    if wants_teacher:
        if reconstruct:
            with torch.no_grad(), resident(models.vae, device, config.offload), \
                    timers.forward("vae_decode", device):
                decoded = adapter.decode_latents(models.vae, latents)[0].transpose(0, 1)  # (F, 3, H, W) in [-1, 1]
            pixels = (decoded.float() + 1.0) / 2.0
        else:
            pixels = frames.permute(0, 3, 1, 2)  # (F, 3, H, W) uint8: converted per encoder batch, used frames only
        with resident(models.teacher.model, device, config.offload), timers.forward("encoder", device):
            patch, cls = models.teacher.latent_features(pixels, models.temporal)
        host_dtype = _host_dtype(config.teacher.dtype)
        arrays["teacher"] = {"patch": _to_numpy(patch, host_dtype), "cls": _to_numpy(cls, host_dtype)}
    if models.conditioning is not None and clip.key in todo["condition"]:
        with torch.no_grad(), contextlib.ExitStack() as on_device, timers.forward("condition", device):
            on_device.enter_context(resident(models.vae, device, config.offload))
            if models.image_encoders is not None:
                on_device.enter_context(resident(models.image_encoders["image_encoder"], device, config.offload))
            condition = adapter.encode_condition(models.vae, models.image_encoders, frames, models.conditioning)
        arrays["condition"] = {name: _to_numpy(array, config.latents_dtype) for name, array in condition.items()}
    return arrays


def _host_dtype(storage: str) -> str:
    """Dtype the features leave the device in: int8 is quantised on the writer thread, from float16."""
    return "float16" if storage == "int8" else storage


def _quantize_patch(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"patch", "cls"} -> int8 "patch" steps with their (f, ht, wt, 1) fp16 "patch_scale"; CLS stays fp16."""
    steps, scale = quantize_per_token(arrays["patch"])
    return {"patch": steps, "patch_scale": scale, "cls": arrays["cls"]}


def _encode_latents(adapter: FamilyAdapter, config: PrecomputeConfig, device: torch.device, vae: nn.Module, key: str,
                    frames: torch.Tensor, timers: Timers) -> torch.Tensor:
    """(F, H, W, 3) uint8 frames on the device -> (1, C, f, h, w) normalised latents."""
    pixels = frames.permute(3, 0, 1, 2).unsqueeze(0).float().div_(127.5).sub_(1.0)  # (1, 3, F, H, W) in [-1, 1]
    generator = None
    if config.latent_sampling == "sample":
        generator = torch.Generator(device).manual_seed(_clip_seed(config.seed, key))
    with torch.no_grad(), resident(vae, device, config.offload), timers.forward("vae", device):
        return adapter.encode_video(vae, pixels, config.latent_sampling == "sample", generator)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
