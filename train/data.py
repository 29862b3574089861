"""Batches from the cache: random access into the Zarr store, or streaming webdataset shards.

Every sample carries its clip key; latents, teacher and text are joined by key in the cache view.
"""

from __future__ import annotations

import math
import posixpath
import random
from collections import Counter
from collections.abc import Iterator

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView, ViewClip
from crepa.cache.wds import CONDITION_ARRAYS, INDEX_NAME, decoded, shard_samples
from crepa.errors import UserError
from crepa.families import Conditioning


def is_webdataset(cache: str) -> bool:
    """A folder (path or URL) of .tar shards or with a shard index, the index itself, a .tar or a brace pattern."""
    if cache.endswith((".tar", ".json")) or "{" in cache:
        return True
    fs, root = fsspec.core.url_to_fs(cache)
    return fs.exists(posixpath.join(root, INDEX_NAME)) or bool(fs.glob(posixpath.join(root, "*.tar")))


class ZarrClips(Dataset):
    """Map-style dataset over the view's complete clips (DataLoader workers reopen the store when unpickled)."""

    def __init__(self, cache: str, family: str, encoder: str | None, with_teacher: bool):
        self.view = CacheView(CacheStore.open(cache), family, encoder, with_teacher)
        self.clips: list[ViewClip] = self.view.clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        return to_tensors(self.view.load(self.clips[index]))


def to_tensors(sample: dict) -> dict:
    """numpy arrays -> tensors: latents, text and image conditions in fp32, teacher kept in its storage dtype."""
    out = {"key": sample["key"], "fps": sample.get("fps"),
           "latents": torch.from_numpy(np.asarray(sample["latents"], dtype=np.float32)),
           "text": torch.from_numpy(np.asarray(sample["text"], dtype=np.float32))}
    for name in ("text_pooled", *CONDITION_ARRAYS):
        if sample.get(name) is not None:
            out[name] = torch.from_numpy(np.asarray(sample[name], dtype=np.float32))
    if sample.get("teacher") is not None:
        out["teacher"] = torch.from_numpy(np.ascontiguousarray(sample["teacher"]))
    return out


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of clips from one bucket, shuffled with (seed, epoch), split across ranks.

    Every rank builds the same epoch order and takes batches[rank::world], so the processes
    see disjoint parts of each epoch; `skip` resumes mid-epoch on exactly the same order.
    """

    def __init__(self, groups: list[str], repeats: list[int], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.groups, self.repeats = groups, repeats
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_group: dict[str, list[int]] = {}
        for index, (group, repeat) in enumerate(zip(self.groups, self.repeats, strict=True)):
            by_group.setdefault(group, []).extend([index] * repeat)
        batches = []
        for group in sorted(by_group):
            items = by_group[group]
            order = torch.randperm(len(items), generator=generator).tolist()
            shuffled = [items[i] for i in order]
            usable = len(shuffled) - len(shuffled) % self.batch_size
            batches += [shuffled[i: i + self.batch_size] for i in range(0, usable, self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in order]
        batches = batches[: len(batches) - len(batches) % self.world]  # equal share per rank
        return batches[self.rank:: self.world]

    def check_not_empty(self) -> None:
        """Refuse an epoch without a batch for this rank: the training loop would wait for one forever."""
        if self.epoch_batches(0):
            return
        sizes = Counter()
        for group, repeat in zip(self.groups, self.repeats, strict=True):
            sizes[group] += repeat
        full = sum(n // self.batch_size for n in sizes.values())
        if not full:
            buckets = ", ".join(f"{group}: {n} clips" for group, n in sorted(sizes.items()))
            raise UserError(f"no bucket holds a full batch ({buckets}; repeats counted) with --batch-size "
                            f"{self.batch_size}; use --batch-size {max(sizes.values())} or less, or add clips "
                            "or --num-repeats")
        raise UserError(f"an epoch has {full} batch(es) for {self.world} rank(s), so rank {self.rank} gets none; "
                        "use fewer ranks or a smaller --batch-size")

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.skip:]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) - self.skip


class WebDatasetClips(IterableDataset):
    """Streams exported shards: exactly `batches_per_epoch` batches per rank and epoch, each of one bucket.

    Every rank shuffles the shard list with (seed, epoch) the same way; slot rank * workers + worker of the
    ranks x loader workers slots takes shards[slot::slots]. With fewer shards than slots, every slot reads all
    shards and keeps samples[slot::slots] instead. A slot that runs out of samples before its share of batches
    reads its shards again (samples reshuffled); one with more stops at its share, so no rank waits at an all-reduce.
    Each sample appears num_repeats (its own, from its json) x `num_repeats` times per pass.
    """

    def __init__(self, urls: list[str], batch_size: int, seed: int, with_teacher: bool, *, batches_per_epoch: int,
                 rank: int = 0, world: int = 1, num_repeats: int = 1, buffer: int = 64):
        if not urls:
            raise UserError("no webdataset shards found; export them with `crepa cache export --format wds`")
        self.urls, self.batch_size, self.seed, self.with_teacher = urls, batch_size, seed, with_teacher
        self.batches_per_epoch, self.rank, self.world = batches_per_epoch, rank, world
        self.num_repeats, self.buffer = num_repeats, buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        return self.slot_batches(info.id if info else 0, info.num_workers if info else 1)

    def slot_shards(self, worker: int, workers: int) -> tuple[list[str], int, int]:
        """(shards this rank's `worker` reads, its sample slot, sample slots) in this epoch."""
        slots, slot = self.world * workers, self.rank * workers + worker
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        if len(order) >= slots:
            return order[slot::slots], 0, 1
        return order, slot, slots

    def slot_batches(self, worker: int, workers: int) -> Iterator[list[dict]]:
        """This rank's `worker`'s share of the epoch's batches; the workers' shares add up to batches_per_epoch."""
        quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        urls, keep, keep_every = self.slot_shards(worker, workers)
        pending: dict[str, list[dict]] = {}
        produced = passes = 0
        while produced < quota:
            seen = 0
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{passes}")
            for sample in self._shuffled(self._repeated(urls, keep, keep_every), rng):
                seen += 1
                group = pending.setdefault(sample["json"]["group"], [])
                group.append(self._record(sample))
                if len(group) == self.batch_size:
                    yield pending.pop(sample["json"]["group"])
                    produced += 1
                    if produced == quota:
                        return
            if not seen:
                raise UserError(f"rank {self.rank} loader worker {worker} got no samples from {len(urls)} shard(s); "
                                 "use fewer ranks or --dataloader-num-workers, or export more clips")
            passes += 1

    def _repeated(self, urls: list[str], keep: int, keep_every: int) -> Iterator[dict]:
        kept = (s for i, s in enumerate(shard_samples(urls)) if i % keep_every == keep)
        for sample in decoded(kept):
            for _ in range(int(sample["json"].get("num_repeats", 1)) * self.num_repeats):
                yield sample

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """A shuffle buffer of `buffer` samples: neighbours in a shard (and repeats of one clip) spread out."""
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _record(self, sample: dict) -> dict:
        if self.with_teacher and "teacher.npy" not in sample:
            raise UserError(f"shard sample {sample['__key__']} has no teacher.npy; export with the teacher "
                             "or train with --crepa-use-backbone-features / --no-crepa-enabled")
        return to_tensors({"key": sample["__key__"], "fps": sample["json"].get("fps"), "latents": sample["latents.npy"],
                           "text": sample["text.npy"], "text_pooled": sample.get("text_pooled.npy"),
                           "teacher": sample.get("teacher.npy") if self.with_teacher else None,
                           **{name: sample.get(f"{name}.npy") for name in CONDITION_ARRAYS}})


def collate_text(samples: list[dict], text_length: int) -> dict:
    """{'text' (B, L, D) zero-padded to the cached max length L, 'text_mask' (B, L), 'text_pooled' (B, P) where
    the samples have one} from samples' 'text' (L_i, D) and 'text_pooled' (P,) tensors."""
    size, text_dim = len(samples), samples[0]["text"].shape[-1]
    text = batch_tensor((size, text_length, text_dim), torch.float32)
    mask = torch.zeros(size, text_length, dtype=torch.bool)
    for row, sample in enumerate(samples):
        length = min(sample["text"].shape[0], text_length)
        text[row, :length] = sample["text"][:length]
        text[row, length:] = 0
        mask[row, :length] = True
    batch = {"text": text, "text_mask": mask}
    if "text_pooled" in samples[0]:
        batch["text_pooled"] = stack([s["text_pooled"] for s in samples])
    return batch


def prompt_conditioning(texts: list[dict], text_length: int) -> Conditioning:
    """The Conditioning of prompts' cached text arrays ('text' (L_i, D), maybe 'text_pooled' (P,)), padded as
    `collate` pads a batch's; fps NaN, which leaves the frame rate to the family."""
    samples = [{name: torch.from_numpy(np.asarray(array, dtype=np.float32)) for name, array in text.items()}
               for text in texts]
    return Conditioning(**collate_text(samples, text_length), fps=torch.full((len(texts),), math.nan))


def collate(samples: list[dict], text_length: int) -> dict:
    """Stack one bucket's samples; text is zero-padded to the cached max length with a mask, fps NaN where unknown."""
    batch = {"keys": [s["key"] for s in samples], "latents": stack([s["latents"] for s in samples]),
             **collate_text(samples, text_length),
             "fps": torch.tensor([math.nan if s.get("fps") is None else s["fps"] for s in samples])}
    for name in (*CONDITION_ARRAYS, "teacher"):
        if name in samples[0]:
            batch[name] = stack([s[name] for s in samples])
    return batch


def split_by_text_length(batch: dict,
                         lengths: torch.Tensor | None = None) -> tuple[dict, list[tuple[slice, int]]]:
    """(the collated batch with its clips in order of caption length, (rows, caption length) of each length).

    For families whose text cannot be padded: each run of rows is one forward on that many text tokens. Read from
    the host copy of the mask, so it costs no device sync; `lengths` (B,) overrides the mask's counts.
    """
    lengths = batch["text_mask"].sum(dim=1) if lengths is None else lengths
    order = torch.sort(lengths, stable=True).indices
    if not torch.equal(order, torch.arange(len(order))):
        batch = {name: [value[i] for i in order.tolist()] if isinstance(value, list) else value[order]
                 for name, value in batch.items()}
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    ends = counts.cumsum(0)
    return batch, [(slice(end - count, end), length)
                   for length, count, end in zip(values.tolist(), counts.tolist(), ends.tolist(), strict=True)]


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch.

    In a DataLoader worker it is allocated in shared memory, so handing the batch to the main process moves
    no data (torch's default_collate does the same). In the main process numpy allocates it: numpy puts large
    buffers on transparent huge pages, which makes filling ~100 MB about 3x faster than after torch.empty.
    """
    if get_worker_info() is None:  # unsigned ints of the same width view as any dtype, bfloat16 included
        return torch.from_numpy(np.empty(shape, f"u{dtype.itemsize}")).view(dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(B, *shape): one sample in the main process is a view, not a copy of up to ~90 MB of teacher features."""
    if len(tensors) == 1 and get_worker_info() is None:
        return tensors[0].unsqueeze(0)
    return torch.stack(tensors, out=batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype))
