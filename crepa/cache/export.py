"""Export a cache's training view to webdataset shards for streaming across nodes."""

from __future__ import annotations

from collections.abc import Iterator

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView, cache_family
from crepa.cache.wds import CONDITION_ARRAYS, export_webdataset


def view_samples(view: CacheView) -> Iterator[dict]:
    """One webdataset sample per complete clip, keyed by its clip key; its json carries the view's `view_meta`."""
    meta = view_meta(view)
    for clip in view.clips:
        arrays = view.load(clip)
        sample = {"__key__": clip.key, "latents.npy": arrays["latents"], "text.npy": arrays["text"],
                  "json": {"key": clip.key, "caption": clip.caption, "group": clip.group, "source": clip.source,
                           "num_repeats": clip.num_repeats, "text_key": clip.text_key, "fps": arrays["fps"], **meta}}
        if "text_pooled" in arrays:
            sample["text_pooled.npy"] = arrays["text_pooled"]
        if view.teacher is not None:
            sample["teacher.npy"] = arrays["teacher"]
        for name in CONDITION_ARRAYS:  # image-to-video views
            if name in arrays:
                sample[f"{name}.npy"] = arrays[name]
        yield sample


def view_meta(view: CacheView) -> dict:
    """What the shards were made for, in every sample's json and their index; the trainer checks it before step 0.

    Its keys are `crepa.cache.wds.META_KEYS`, which `crepa cache index` reads back from the samples.
    """
    teacher = view.teacher.attrs if view.teacher is not None else {}
    return {"family": view.family, "latents_set": view.latents.fingerprint, "text_set": view.text.fingerprint,
            "text_max_length": view.text.attrs["max_length"],
            "condition_set": view.condition.fingerprint if view.condition is not None else None,
            "teacher_set": view.teacher.fingerprint if view.teacher is not None else None,
            "encoder": teacher.get("encoder"), "encoder_path": teacher.get("encoder_path")}


def export_view(cache: str, out_dir: str, *, family: str | None = None, encoder: str | None = None,
                with_teacher: bool = True, maxcount: int = 1000, maxsize: int = 2**30,
                overwrite: bool = False) -> list[str]:
    """Shards `cache-000000.tar`, ... and their index `shards.json` under `out_dir`; returns the shards' URLs.

    The family defaults to the cache's own (an error lists them when it holds several).
    """
    store = CacheStore.open(cache)
    view = CacheView(store, cache_family(store, family), encoder, with_teacher)
    return export_webdataset(view_samples(view), out_dir, maxcount=maxcount, maxsize=maxsize, meta=view_meta(view),
                             overwrite=overwrite)
