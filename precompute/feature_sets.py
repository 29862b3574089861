"""Identity and description of the three feature sets one precompute run fills.

The identity is what the set's fingerprint hashes: change any of it and a new set is computed,
so a changed model or setting is never served stale. The description is what the trainer and
`crepa cache info` read back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from crepa.cache.store import CacheStore, FeatureSet
from crepa.encoders import resolve_encoder
from crepa.families.base import FamilyAdapter
from crepa.families.loading import component_identity
from precompute.config import PrecomputeConfig
from precompute.models import text_overrides
from precompute.teacher import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class RunFeatureSets:
    latents: FeatureSet
    text: FeatureSet
    teacher: FeatureSet | None


def latents_identity(adapter: FamilyAdapter, config: PrecomputeConfig, vae_dtype: str) -> dict:
    return {
        "family": adapter.name,
        "vae": component_identity(config.model, "vae", config.vae),
        "compute_dtype": vae_dtype,
        "dtype": config.latents_dtype,
        "sampling": config.latent_sampling,
        "seed": config.seed if config.latent_sampling == "sample" else None,
        "tiling": config.vae_tiling,
    }


def text_identity(adapter: FamilyAdapter, config: PrecomputeConfig, text_dtype: str, max_length: int) -> dict:
    return {
        "family": adapter.name,
        **{subfolder: component_identity(config.model, subfolder, override)
           for subfolder, override in text_overrides(adapter, config).items()},
        "compute_dtype": text_dtype,
        "dtype": config.text_dtype,
        "max_length": max_length,
    }


def teacher_identity(config: PrecomputeConfig, encoder_dtype: str, latents: dict, temporal: int) -> dict:
    teacher = config.teacher
    return {
        "encoder": component_identity(None, "encoder", resolve_encoder(teacher.encoder)),
        "compute_dtype": encoder_dtype,
        "image_size": teacher.image_size,
        "resize": teacher.resize,
        "frames": teacher.frames,
        "input": teacher.input,
        "dtype": teacher.dtype,
        "pool": teacher.pool,
        "temporal_compression": temporal,
        # the reconstruction depends on the VAE that made the latents
        "latents": latents if teacher.input == "reconstruction" else None,
    }


def open_feature_sets(
    store: CacheStore,
    adapter: FamilyAdapter,
    config: PrecomputeConfig,
    dtypes: dict[str, str],
    vae_config: dict,
    max_length: int,
    encoder_config: dict | None,
) -> RunFeatureSets:
    """Create (or find) the run's feature sets, with attributes that describe their arrays.

    A dry run creates none: sets the cache lacks are planned against empty stand-ins.
    """
    temporal, spatial = adapter.vae_compression(vae_config)
    feature_set = functools.partial(store.feature_set, missing_ok=config.dry_run)
    latents_id = latents_identity(adapter, config, dtypes["vae"])
    latents = feature_set("latents", latents_id, {
        "family": adapter.name,
        "vae": config.vae or config.model,
        "arrays": {"latents": "(C, f, h, w) normalised latents"},
        "channels": vae_config.get("z_dim", vae_config.get("latent_channels")),
        "temporal_compression": temporal,
        "spatial_compression": spatial,
        "normalisation": adapter.latents_normalisation,
        "dtype": config.latents_dtype,
    })
    text = feature_set("text", text_identity(adapter, config, dtypes["text_encoder"], max_length), {
        "family": adapter.name,
        "text_encoder": config.text_encoder or config.model,
        "arrays": {"embeds": "(L, D) last hidden state without padding"},
        "max_length": max_length,
        "dtype": config.text_dtype,
    })
    teacher = None
    if not config.skip_teacher:
        settings = config.teacher
        teacher = feature_set("teacher", teacher_identity(config, dtypes["encoder"], latents_id, temporal), {
            "family": adapter.name,
            "encoder": settings.encoder,
            "encoder_path": resolve_encoder(settings.encoder),
            "dim": encoder_config["hidden_size"],
            "patch_size": encoder_config["patch_size"],
            "register_tokens": encoder_config.get("num_register_tokens", 0),
            "arrays": {"patch": "(f, ht, wt, D) patch tokens per latent frame", "cls": "(f, D) CLS token"}
            | ({"patch_scale": "(f, ht, wt, 1) fp16 per-token scale: features = int8 patch * patch_scale"}
               if settings.dtype == "int8" else {}),
            "image_size": settings.image_size,
            "resize": settings.resize,
            "frames": settings.frames,
            "input": settings.input,
            "pool": settings.pool,
            "dtype": settings.dtype,
            "temporal_mapping": f"latent frame 0 <- pixel frame 0; latent frame i >= 1 <- pixel frames "
                                f"{temporal}*(i-1)+1 .. {temporal}*i ({settings.frames})",
            "normalisation": f"frames in [0, 1], ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}; features are "
                             "last_hidden_state after the final layernorm, CLS and register tokens removed",
        })
    return RunFeatureSets(latents=latents, text=text, teacher=teacher)
