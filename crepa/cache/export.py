"""Export a cache's training view to webdataset shards for streaming across nodes."""

from __future__ import annotations

from collections.abc import Iterator

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.cache.wds import export_webdataset


def view_samples(view: CacheView) -> Iterator[dict]:
    """One webdataset sample per complete clip, keyed by its clip key."""
    for clip in view.clips:
        arrays = view.load(clip)
        sample = {"__key__": clip.key, "latents.npy": arrays["latents"], "text.npy": arrays["text"],
                  "json": {"key": clip.key, "caption": clip.caption, "group": clip.group, "source": clip.source,
                           "num_repeats": clip.num_repeats, "text_key": clip.text_key, "family": view.family,
                           "text_max_length": view.text.attrs["max_length"],
                           "latents_set": view.latents.fingerprint, "text_set": view.text.fingerprint,
                           "teacher_set": view.teacher.fingerprint if view.teacher else None}}
        if view.teacher is not None:
            sample["teacher.npy"] = arrays["teacher"]
        yield sample


def export_view(cache: str, out_dir: str, *, family: str, encoder: str | None = None, with_teacher: bool = True,
                maxcount: int = 1000, maxsize: int = 2**30) -> list[str]:
    """Shards `cache-000000.tar`, ... under `out_dir`; returns their paths."""
    view = CacheView(CacheStore.open(cache), family, encoder, with_teacher)
    return export_webdataset(view_samples(view), out_dir, maxcount=maxcount, maxsize=maxsize)
