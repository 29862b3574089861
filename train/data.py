"""Batches from the cache: random access into the Zarr store, or streaming webdataset shards.

Every sample carries its clip key; latents, teacher and text are joined by key in the cache view.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView, ViewClip


def is_webdataset(cache: str) -> bool:
    """A folder of .tar shards, a .tar file or a brace pattern is streamed; anything else is a Zarr cache."""
    if cache.endswith(".tar") or "{" in cache:
        return True
    return os.path.isdir(cache) and bool(glob.glob(os.path.join(cache, "*.tar")))


def shard_urls(cache: str) -> list[str]:
    if os.path.isdir(cache):
        return sorted(glob.glob(os.path.join(cache, "*.tar")))
    import braceexpand

    return list(braceexpand.braceexpand(cache))


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
    """numpy arrays -> tensors: latents and text in fp32, teacher kept in its storage dtype."""
    out = {"key": sample["key"], "latents": torch.from_numpy(np.asarray(sample["latents"], dtype=np.float32)),
           "text": torch.from_numpy(np.asarray(sample["text"], dtype=np.float32))}
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

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.skip:]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) - self.skip


class WebDatasetClips(IterableDataset):
    """Streams exported shards; shards are split across ranks and workers, batches keep one bucket."""

    def __init__(self, urls: list[str], batch_size: int, seed: int, with_teacher: bool, buffer: int = 64):
        if not urls:
            raise ValueError("no webdataset shards found; export them with `crepa cache export --format wds`")
        self.urls = urls
        self.batch_size = batch_size
        self.seed = seed
        self.with_teacher = with_teacher
        self.buffer = buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[dict]]:
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls, seed=self.seed + self.epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            wds.shuffle(self.buffer, seed=self.seed + self.epoch),
            wds.decode(),
        )
        pending: dict[str, list[dict]] = {}
        for sample in pipeline:
            if self.with_teacher and "teacher.npy" not in sample:
                raise ValueError(f"shard sample {sample['__key__']} has no teacher.npy; export with the teacher "
                                 "or train with --crepa-use-backbone-features / --no-crepa-enabled")
            record = {"key": sample["__key__"], "latents": sample["latents.npy"], "text": sample["text.npy"],
                      "teacher": sample.get("teacher.npy") if self.with_teacher else None}
            group = pending.setdefault(sample["json"]["group"], [])
            group.append(to_tensors(record))
            if len(group) == self.batch_size:
                yield pending.pop(sample["json"]["group"])


def collate(samples: list[dict], text_length: int) -> dict:
    """Stack one bucket's samples; text is zero-padded to the cached max length with a mask."""
    size, text_dim = len(samples), samples[0]["text"].shape[-1]
    text = batch_tensor((size, text_length, text_dim), torch.float32)
    mask = torch.zeros(size, text_length, dtype=torch.bool)
    for row, sample in enumerate(samples):
        length = min(sample["text"].shape[0], text_length)
        text[row, :length] = sample["text"][:length]
        text[row, length:] = 0
        mask[row, :length] = True
    batch = {"keys": [s["key"] for s in samples], "latents": stack([s["latents"] for s in samples]),
             "text": text, "text_mask": mask}
    if "teacher" in samples[0]:
        batch["teacher"] = stack([s["teacher"] for s in samples])
    return batch


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
