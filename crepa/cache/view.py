"""The training view of a cache: one latents set, one text set, optionally one teacher set and the first-frame
condition set of image-to-video plans, joined by key."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crepa.cache.keys import text_key
from crepa.cache.quantize import dequantize_per_token
from crepa.cache.store import CacheStore, EntryReadError, FeatureSet
from crepa.encoders import resolve_encoder
from crepa.errors import UserError


def plans_by_family(store: CacheStore) -> dict[str, dict[str, dict]]:
    """The cache's dataset plans by name, under the family each was made for; a cache without one is refused."""
    by_family: dict[str, dict[str, dict]] = {}
    for name, plan in store.plans().items():
        by_family.setdefault(plan["family"], {})[name] = plan
    if not by_family:
        raise UserError(f"cache {store.url} has no dataset plan; run `crepa precompute --out {store.url}` first")
    return by_family


def cache_family(store: CacheStore, family: str | None = None) -> str:
    """`family`, or the one family the cache's plans were made for; several need a choice."""
    if family:
        return family
    families = sorted(plans_by_family(store))
    if len(families) > 1:
        raise UserError(f"cache {store.url} holds clips for families {', '.join(families)}; choose one with "
                         "--family")
    return families[0]


@dataclass(frozen=True)
class ViewClip:
    """A clip the view can serve; every join goes through its keys, never positions."""

    key: str
    text_key: str
    caption: str
    group: str
    source: str
    num_repeats: int


class CacheView:
    """Selects feature sets for one family/encoder and lists the clips complete in all of them."""

    def __init__(self, store: CacheStore, family: str, encoder: str | None = None, with_teacher: bool = True):
        by_family = plans_by_family(store)
        if family not in by_family:
            families = sorted(by_family)
            raise UserError(
                f"cache {store.url} was made for family {', '.join(families)}, not {family!r}; "
                f"pass --family {families[0]} or precompute a cache for {family}"
            )
        plans = by_family[family]
        # plans from before image-to-video conditions have no condition set
        made_with = {(plan["latents_set"], plan["text_set"], plan.get("condition_set")) for plan in plans.values()}
        if len(made_with) > 1:
            raise UserError(
                f"cache {store.url} holds {family} plans made with different VAEs, text encoders or image "
                f"conditionings ({', '.join(sorted(plans))}); precompute them with the same model or use separate "
                "caches"
            )
        latents_fp, text_fp, condition_fp = made_with.pop()
        self.store = store
        self.family = family
        self.plans: list[dict] = [plans[name] for name in sorted(plans)]
        self.latents = self._by_fingerprint("latents", latents_fp)
        self.text = self._by_fingerprint("text", text_fp)
        self.condition = self._by_fingerprint("condition", condition_fp) if condition_fp else None
        self.teacher = self._teacher_set(encoder) if with_teacher else None

        clips: dict[str, ViewClip] = {}
        for plan in plans.values():
            for entry in plan["clips"]:
                clips.setdefault(entry["key"], ViewClip(entry["key"], entry["text_key"], entry["caption"],
                                                        entry["group"], entry["source"], entry["num_repeats"]))
        have_latents, have_text = store.keys(self.latents), store.keys(self.text)
        have_teacher = store.keys(self.teacher) if self.teacher is not None else None
        have_condition = store.keys(self.condition) if self.condition is not None else None
        self.clips: list[ViewClip] = []
        self.incomplete: list[ViewClip] = []
        for clip in sorted(clips.values(), key=lambda c: c.key):
            complete = clip.key in have_latents and clip.text_key in have_text
            complete = complete and (have_teacher is None or clip.key in have_teacher)
            complete = complete and (have_condition is None or clip.key in have_condition)
            (self.clips if complete else self.incomplete).append(clip)

    def _by_fingerprint(self, kind: str, fingerprint: str) -> FeatureSet:
        for fs in self.store.feature_sets(kind):
            if fs.fingerprint == fingerprint:
                return fs
        raise UserError(f"cache {self.store.url} lost its {kind} set {fingerprint}; rerun `crepa precompute`")

    def _teacher_set(self, encoder: str | None) -> FeatureSet:
        candidates = [fs for fs in self.store.feature_sets("teacher") if fs.attrs.get("family") == self.family]
        if encoder is not None:
            wanted = {encoder, resolve_encoder(encoder)}
            candidates = [fs for fs in candidates
                          if fs.attrs.get("encoder") in wanted or fs.attrs.get("encoder_path") in wanted
                          or fs.fingerprint == encoder]
        if len(candidates) == 1:
            return candidates[0]
        listing = "; ".join(f"{fs.fingerprint} ({fs.attrs.get('encoder')}, {fs.attrs.get('image_size')}px, "
                            f"{fs.attrs.get('resize')}, {fs.attrs.get('frames')})" for fs in candidates)
        if not candidates:
            every = [fs.attrs.get("encoder") for fs in self.store.feature_sets("teacher")]
            raise UserError(
                f"cache {self.store.url} has no {self.family} teacher features"
                + (f" for encoder {encoder!r}" if encoder else "")
                + (f" (it has: {', '.join(map(str, every))}); pass one of those to --crepa-encoder" if every else
                   "; precompute them with `crepa precompute --encoder ...` or train with "
                   "--crepa-use-backbone-features")
            )
        raise UserError(f"cache {self.store.url} has several teacher sets: {listing}; "
                         "choose one with --crepa-encoder NAME or FINGERPRINT")

    def load(self, clip: ViewClip) -> dict[str, np.ndarray | str]:
        """{'key', 'fps', 'latents' (C, F, H, W), 'text' (L, D), 'text_pooled' (P,) where the text set has one,
        'teacher' (F, ht, wt, D) when selected, 'condition' (C_c, F, H, W) and/or 'image_embeds' (N, D_img) where
        the view has a condition set}.

        `fps` is the frame rate of the clip's sampled frames, from its latents entry; None where the entry was written
        without one (caches from before clips recorded it).

        Damaged stored bytes stop the caller with one line naming the clip, the array and the fix: training on
        without the clip would silently change what the run learns from.
        """
        try:
            sample: dict[str, np.ndarray | str] = {
                "key": clip.key,
                "fps": self.store.entry(self.latents, clip.key).get("fps"),
                "latents": self.store.read(self.latents, clip.key, ["latents"])["latents"],
            }
            sample |= self._text_arrays(clip.text_key)
            if self.teacher is not None:  # the CLS token is not part of the training view
                sample["teacher"] = self._teacher_patch(clip.key)
            if self.condition is not None:
                sample |= self.store.read(self.condition, clip.key)
        except EntryReadError as exc:
            url = self.store.url
            raise UserError(
                f"clip {clip.key} ({clip.source}, bucket {clip.group}): {exc}",
                fix=f"run `crepa cache verify {url}` to list every damaged entry, `crepa cache repair {url}` to "
                    "remove them, then `crepa precompute` with the same dataset config recomputes them; resume "
                    "training with --resume",
            ) from exc
        return sample

    def vae_compression(self) -> tuple[int, int] | None:
        """(temporal, spatial) compression of the VAE that made the latents, as the latents set records it."""
        attrs = self.latents.attrs
        if "temporal_compression" not in attrs or "spatial_compression" not in attrs:
            return None
        return attrs["temporal_compression"], attrs["spatial_compression"]

    def _text_arrays(self, key: str) -> dict[str, np.ndarray]:
        """{'text' (L, D), 'text_pooled' (P,) where the text set has one} of a text entry."""
        text = self.store.read(self.text, key)
        return {"text": text["embeds"]} | ({"text_pooled": text["pooled"]} if "pooled" in text else {})

    def prompts(self) -> list[str]:
        """The texts of the text set that no clip of the view has for caption (the empty prompt, validation prompts,
        captions of clips no plan lists any more), sorted."""
        used = {clip.text_key for clip in self.clips + self.incomplete}
        return sorted({self.store.entry(self.text, key)["caption"] for key in self.store.keys(self.text) - used})

    def prompt_key(self, prompt: str) -> str:
        """The text key `prompt` has in this view's text set (what precompute files it under)."""
        return text_key(prompt, self.text.attrs["identity"], self.text.attrs["max_length"])

    def prompt_text(self, prompt: str) -> dict[str, np.ndarray] | None:
        """The text arrays of `prompt` as `load` names them ('text', maybe 'text_pooled'); None when the text set
        lacks it (a cache made before precompute encoded it)."""
        key = self.prompt_key(prompt)
        if key not in self.store.keys(self.text):
            return None
        try:
            return self._text_arrays(key)
        except EntryReadError as exc:
            raise UserError(f"the cached text of prompt {prompt!r}: {exc}",
                            fix=f"run `crepa cache repair {self.store.url}`, then rerun `crepa precompute`") from exc

    def precompute_command(self, options: str = "") -> str:
        """The `crepa precompute` command line(s) that fill this view, from its plans, with `options` added."""
        configs = sorted({plan.get("dataset_config") or "DATASET.toml" for plan in self.plans})
        return " and ".join(f"`crepa precompute --config {config} --family {self.family} --out {self.store.url}"
                            f"{options}`" for config in configs)

    def _teacher_patch(self, key: str) -> np.ndarray:
        """(F, ht, wt, D) teacher features; int8 sets are dequantised with their per-token scales, to float16."""
        arrays = self.store.read(self.teacher, key, ["patch", "patch_scale"])
        if "patch_scale" not in arrays:
            return arrays["patch"]
        return dequantize_per_token(arrays["patch"], arrays["patch_scale"]).astype(np.float16)
