"""What the trainer needs to know about its data, and the epoch-aware batch iterator."""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import torch
from torch.utils.data import DataLoader

from crepa.cache.atomic import is_local
from crepa.cache.store import CacheStore
from crepa.cache.view import cache_family
from crepa.cache.wds import CONDITION_ARRAYS, ShardIndex, iter_webdataset, read_index, read_prompt_texts
from crepa.encoders import resolve_encoder
from crepa.errors import UserError
from train.config import TrainConfig
from train.data import BucketBatchSampler, WebDatasetClips, ZarrClips, collate, is_webdataset


@dataclass
class TrainData:
    """Shapes the model must accept, and a way to iterate batches from any (epoch, position)."""

    clips: int
    incomplete: int
    latent_channels: int
    latent_frames: int
    text_dim: int
    text_length: int
    teacher_dim: int | None
    teacher_frames: int | None
    batches_per_epoch: int
    loader_for_epoch: object = field(repr=False)
    shards: int = 0
    """Webdataset shards streamed (0: a Zarr cache)."""
    condition_channels: int = 0
    """Channels of the image-to-video condition concatenated to the latents (0: none cached)."""
    image_embeds_dim: int | None = None
    """Width of the cached first-frame image embeddings (None: none cached)."""
    bucket_latent_shape: tuple[int, ...] = ()
    """(C, f, h, w) of the latents of the cache's first bucket (by name; for shards, the first sample's)."""
    vae_compression: tuple[int, int] | None = None
    """(temporal, spatial) compression of the VAE that made the latents, as the cache records it."""
    prompt_text: Callable[[str], dict | None] = field(default=lambda prompt: None, repr=False)
    """The cached text arrays ('text' (L, D), maybe 'text_pooled' (P,)) of a prompt that is no clip's caption (the
    empty prompt, validation prompts); None where the cache lacks it."""
    prompts_fix: Callable[[str], str] = field(default=lambda options: f"rerun `crepa precompute{options}`",
                                              repr=False)
    """How to add missing prompts to this cache, given the precompute options that add them."""

    def prompt_texts(self, prompts: list[str], needed_for: str, options: str = "") -> list[dict]:
        """The cached text arrays of `prompts`, or one error naming the missing ones and the command that adds them."""
        texts = [self.prompt_text(prompt) for prompt in prompts]
        missing = [repr(prompt) for prompt, text in zip(prompts, texts, strict=True) if text is None]
        if missing:
            raise UserError(f"{needed_for} needs the text of prompt(s) {', '.join(missing[:5])}"
                            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}, which the cache does "
                            "not hold (made before they were added, or without them)",
                            fix=self.prompts_fix(options))
        return texts

    def describe(self) -> str:
        """The start-up line's account of the data."""
        if self.shards:
            return f"{self.clips} clips in {self.shards} shards"
        return f"{self.clips} clips ({self.incomplete} incomplete skipped)"

    def iterate(self, epoch: int, consumed: int) -> Iterator[tuple[int, int, dict]]:
        """(epoch, micro-batches consumed in it, batch) forever, starting after `consumed` in `epoch`.

        A loader worker's error arrives as its message alone; a fresh epoch that gives no batch stops the run,
        which would otherwise wait for one forever.
        """
        while True:
            start = consumed
            try:
                for batch in self.loader_for_epoch(epoch, consumed):
                    consumed += 1
                    yield epoch, consumed, batch
            except UserError as error:
                raise unwrap_worker_error(error) from None
            if consumed == start == 0:  # a resumed epoch may have nothing left; a fresh one must give batches
                raise UserError(f"epoch {epoch} gave no batch (expected {self.batches_per_epoch}); check the batch "
                                "size against the cache's buckets (`crepa cache info`)")
            epoch, consumed = epoch + 1, 0


_WRAPPED = f"{UserError.__module__}.{UserError.__qualname__}: "


def unwrap_worker_error(error: UserError) -> UserError:
    """The UserError a DataLoader worker raised, without the traceback the worker wraps around its message."""
    message = str(error)
    if "DataLoader worker" not in message or _WRAPPED not in message:
        return error
    return UserError(message.rsplit(_WRAPPED, 1)[1].strip())


def loader_kwargs(cfg: TrainConfig) -> dict:
    """DataLoader options of every training loader: workers prefetch ahead, and keep running across epochs."""
    workers = cfg.dataloader_num_workers
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available(),
            "prefetch_factor": 4 if workers else None, "persistent_workers": workers > 0}


def default_family(cache: str) -> str:
    """The family the cache (Zarr store or shards) was made for; an error names them when there are several."""
    if is_webdataset(cache):
        family = read_index(cache).meta.get("family")
        if not family:
            raise UserError(f"the shard index of {cache} records no family; pass --family")
        return family
    return cache_family(CacheStore.open(cache))


def build_data(cfg: TrainConfig, with_teacher: bool, rank: int, world: int) -> TrainData:
    if is_webdataset(cfg.cache):
        return _webdataset_data(cfg, with_teacher, rank, world)
    return _zarr_data(cfg, with_teacher, rank, world)


def _zarr_data(cfg: TrainConfig, with_teacher: bool, rank: int, world: int) -> TrainData:
    dataset = ZarrClips(cfg.cache, cfg.family, cfg.crepa_encoder, with_teacher)
    view = dataset.view
    if not dataset.clips:
        raise UserError(f"cache {cfg.cache} has no complete clip for this configuration "
                         f"({len(view.incomplete)} incomplete); finish it with `crepa precompute`")
    sampler = BucketBatchSampler([c.group for c in dataset.clips],
                                 [c.num_repeats * cfg.num_repeats for c in dataset.clips], cfg.batch_size, cfg.seed,
                                 rank, world)
    text_length = view.text.attrs["max_length"]
    collate_fn = functools.partial(collate, text_length=text_length)

    # One loader for the whole run: the batch sampler runs in this process, so persistent workers
    # serve every epoch's order without being restarted.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **loader_kwargs(cfg))

    def loader_for_epoch(epoch: int, consumed: int):
        sampler.set_epoch(epoch, consumed)
        return loader

    sampler.check_not_empty()
    sampler.set_epoch(0)
    first = dataset[0]  # shapes the model must accept; check_compatibility compares them before step 0
    first_bucket = min(range(len(dataset.clips)), key=lambda i: (dataset.clips[i].group, i))
    return TrainData(
        clips=len(dataset.clips), incomplete=len(view.incomplete), latent_channels=first["latents"].shape[0],
        latent_frames=first["latents"].shape[1], text_dim=first["text"].shape[-1], text_length=text_length,
        teacher_dim=first["teacher"].shape[-1] if "teacher" in first else None,
        teacher_frames=first["teacher"].shape[0] if "teacher" in first else None,
        batches_per_epoch=len(sampler), loader_for_epoch=loader_for_epoch, **condition_shapes(first),
        bucket_latent_shape=tuple((first if first_bucket == 0 else dataset[first_bucket])["latents"].shape),
        vae_compression=view.vae_compression(),
        prompt_text=view.prompt_text,
        prompts_fix=lambda options: f"rerun {view.precompute_command(options)} with the other options that made "
                                    "the cache; it computes only what is missing",
    )


def condition_shapes(sample: dict) -> dict:
    """TrainData's condition_channels and image_embeds_dim from one sample's arrays (tensors or numpy)."""
    condition, image_embeds = sample.get("condition"), sample.get("image_embeds")
    return {"condition_channels": condition.shape[0] if condition is not None else 0,
            "image_embeds_dim": image_embeds.shape[-1] if image_embeds is not None else None}


def check_shards(index: ShardIndex, cfg: TrainConfig, with_teacher: bool) -> None:
    """The shards were made for this family and hold the teacher set asked for, checked before any model loads."""
    meta = index.meta
    if meta.get("family") and meta["family"] != cfg.family:
        raise UserError(f"shards of {cfg.cache} were exported for family {meta['family']}, not --family "
                         f"{cfg.family}; pass --family {meta['family']} or export the {cfg.family} view")
    if not with_teacher:
        return
    if "teacher_set" in meta and not meta["teacher_set"]:
        raise UserError(f"shards of {cfg.cache} carry no teacher features; export them with the teacher or train "
                         "with --crepa-use-backbone-features / --no-crepa-enabled")
    if cfg.crepa_encoder:
        have = {meta.get("encoder"), meta.get("encoder_path"), meta.get("teacher_set")} - {None}
        if not have & {cfg.crepa_encoder, resolve_encoder(cfg.crepa_encoder)}:
            raise UserError(f"shards of {cfg.cache} hold teacher set {meta.get('teacher_set')} (encoder "
                             f"{meta.get('encoder')}), not --crepa-encoder {cfg.crepa_encoder}; export the shards "
                             "with that encoder or drop --crepa-encoder")


def check_shard_sizes(index: ShardIndex) -> None:
    """Local shards must be as long as the index says: a shorter one was cut (a copy or a crash), caught here."""
    for url, expected in zip(index.urls, index.filesizes, strict=True):
        fs, path = fsspec.core.url_to_fs(url)
        if expected is None or not is_local(fs) or not fs.exists(path):
            continue
        size = fs.size(path)
        if size != expected:
            raise UserError(f"shard {url} holds {size} bytes but {index.url} lists {expected}: it is truncated "
                            "or was replaced; re-export the shards with `crepa cache export --format wds "
                            "--overwrite` (or `crepa cache index` for shards made another way)")


def _webdataset_data(cfg: TrainConfig, with_teacher: bool, rank: int, world: int) -> TrainData:
    index = read_index(cfg.cache)
    check_shards(index, cfg, with_teacher)
    slots = world * max(1, cfg.dataloader_num_workers)
    if sum(index.nsamples) < slots:
        raise UserError(f"{index.url} holds {sum(index.nsamples)} samples, too few for {world} rank(s) x "
                         f"{max(1, cfg.dataloader_num_workers)} loader worker(s); use fewer of either")
    check_shard_sizes(index)
    total = sum(index.repeated) * cfg.num_repeats
    batches_per_epoch = total // (cfg.batch_size * world)
    if not batches_per_epoch:
        raise UserError(f"shards of {cfg.cache} hold {total} samples (repeats counted), too few for --batch-size "
                        f"{cfg.batch_size} x {world} rank(s); use --batch-size {max(1, total // world)} or less, "
                        "fewer ranks, or export more clips")
    stream = WebDatasetClips(index.urls, cfg.batch_size, cfg.seed, with_teacher, batches_per_epoch=batches_per_epoch,
                             rank=rank, world=world, num_repeats=cfg.num_repeats)
    first = next(iter_webdataset(index.urls[:1]))  # shapes and text length from the first sample
    prompts = functools.cache(lambda: read_prompt_texts(index))  # read when a prompt is first asked for
    compression = index.meta.get("vae_compression")
    meta, latents, text, teacher = first["json"], first["latents.npy"], first["text.npy"], first.get("teacher.npy")
    if with_teacher and teacher is None:
        raise UserError(f"shards in {cfg.cache} carry no teacher features; export them with the teacher")
    text_length = meta["text_max_length"]
    collate_fn = functools.partial(collate, text_length=text_length)

    def loader_for_epoch(epoch: int, consumed: int):
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=None, collate_fn=collate_fn,
                            **(loader_kwargs(cfg) | {"persistent_workers": False}))
        return (batch for index, batch in enumerate(loader) if index >= consumed)

    return TrainData(
        clips=sum(index.nsamples), incomplete=0, latent_channels=latents.shape[0], latent_frames=latents.shape[1],
        text_dim=text.shape[-1], text_length=text_length,
        teacher_dim=teacher.shape[-1] if teacher is not None else None,
        teacher_frames=teacher.shape[0] if teacher is not None else None,
        batches_per_epoch=batches_per_epoch, loader_for_epoch=loader_for_epoch, shards=len(index.urls),
        **condition_shapes({name: first.get(f"{name}.npy") for name in CONDITION_ARRAYS}),
        bucket_latent_shape=tuple(latents.shape), vae_compression=tuple(compression) if compression else None,
        prompt_text=lambda prompt: prompts().get(prompt),
        prompts_fix=lambda options: f"rerun `crepa precompute{options}` (with the options that made the cache these "
                                    "shards came from), then re-export them with `crepa cache export --format wds "
                                    f"CACHE {posixpath.dirname(index.url)} --overwrite`",
    )
