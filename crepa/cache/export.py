"""Export a cache's training view to webdataset shards for streaming across nodes."""

from __future__ import annotations

from collections.abc import Iterator

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView, cache_family
from crepa.cache.wds import CONDITION_ARRAYS, PROMPTS_NAME, export_webdataset


def view_samples(view: CacheView, meta: dict) -> Iterator[dict]:
    """One webdataset sample per complete clip, keyed by its clip key; its json carries `meta` (`view_meta`)."""
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


def prompt_samples(view: CacheView) -> list[dict]:
    """One sample per prompt the view's text set holds (the empty prompt, validation prompts), keyed by text key."""
    samples = []
    for prompt in view.prompts():
        arrays = view.prompt_text(prompt)
        if arrays is None:
            continue
        key = view.prompt_key(prompt)
        sample = {"__key__": key, "text.npy": arrays["text"], "json": {"caption": prompt, "text_key": key}}
        if "text_pooled" in arrays:
            sample["text_pooled.npy"] = arrays["text_pooled"]
        samples.append(sample)
    return samples


def view_meta(view: CacheView, with_prompts: bool = False) -> dict:
    """What the shards were made for, in every sample's json and their index; the trainer checks it before step 0.

    Its keys are `crepa.cache.wds.META_KEYS`, which `crepa cache index` reads back from the samples.
    """
    teacher = view.teacher.attrs if view.teacher is not None else {}
    compression = view.vae_compression()
    return {"family": view.family, "latents_set": view.latents.fingerprint, "text_set": view.text.fingerprint,
            "text_max_length": view.text.attrs["max_length"],
            "condition_set": view.condition.fingerprint if view.condition is not None else None,
            "teacher_set": view.teacher.fingerprint if view.teacher is not None else None,
            "encoder": teacher.get("encoder"), "encoder_path": teacher.get("encoder_path"),
            "vae_compression": list(compression) if compression else None,
            "prompts": PROMPTS_NAME if with_prompts else None}


def export_view(cache: str, out_dir: str, *, family: str | None = None, encoder: str | None = None,
                with_teacher: bool = True, maxcount: int = 1000, maxsize: int = 2**30,
                overwrite: bool = False) -> list[str]:
    """Shards `cache-000000.tar`, ..., the prompts beside the captions in `prompts.tar`, and their index
    `shards.json` under `out_dir`; returns the shards' URLs.

    The family defaults to the cache's own (an error lists them when it holds several).
    """
    store = CacheStore.open(cache)
    view = CacheView(store, cache_family(store, family), encoder, with_teacher)
    prompts = prompt_samples(view)
    meta = view_meta(view, with_prompts=bool(prompts))
    return export_webdataset(view_samples(view, meta), out_dir, maxcount=maxcount, maxsize=maxsize, meta=meta,
                             overwrite=overwrite, prompts=prompts)
