"""Options of `crepa precompute`, validated before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from crepa.cache.store import CODECS
from crepa.fields import check_fields

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LATENT_SAMPLING = ("mode", "sample")
RESIZE_MODES = ("aspect", "square")
TEACHER_FRAMES = ("stride", "mean")
TEACHER_INPUTS = ("pixels", "reconstruction")
STORAGE_DTYPES = ("float16", "float32")
TEACHER_DTYPES = (*STORAGE_DTYPES, "int8")


@dataclass
class TeacherSettings:
    """Everything that determines the stored teacher features (all part of the feature-set key)."""

    encoder: str = field(default="dinov2_vitg14", metadata={"flag": "encoder"})
    """Short name (dinov2_vits14 ... dinov2_vitg14, *_reg), hub id or local folder."""
    image_size: int = field(default=518, metadata={"flag": "encoder-image-size", "min": 14})
    """Square side, or the side of the equal-area image in `aspect` mode."""
    resize: str = field(default="aspect", metadata={"flag": "resize", "choices": RESIZE_MODES})
    """aspect: keep the clip's aspect ratio, sides multiples of the patch size; square: image_size^2."""
    frames: str = field(default="stride", metadata={"flag": "teacher-frames", "choices": TEACHER_FRAMES})
    """stride: the last pixel frame a latent frame covers; mean: average of its covered frames' features."""
    input: str = field(default="pixels", metadata={"flag": "teacher-input", "choices": TEACHER_INPUTS})
    """pixels: decoded source frames; reconstruction: the VAE's reconstruction of the latents."""
    dtype: str = field(default="float16", metadata={"flag": "teacher-dtype", "choices": TEACHER_DTYPES})
    """Storage dtype of the features; int8 stores symmetric steps with one fp16 scale per token (half of
    float16's bytes, token cosine error ~1e-5 times the square of a token's peak-to-RMS channel ratio)."""
    pool: int = field(default=1, metadata={"flag": "teacher-pool", "min": 1})
    """Average-pool the patch grid by this factor at precompute (1 keeps it)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PrecomputeConfig:
    """One precompute run: which clips, which models, where the cache goes."""

    dataset_config: str = field(metadata={"flag": "config"})
    """TOML file with [general] and [[datasets]] tables."""
    family: str
    """Model family: wan, ..."""
    out: str
    """Cache directory or fsspec URL."""
    model: str | None = None
    """Diffusers pipeline folder or hub id holding vae/, text_encoder/ and tokenizer/."""
    vae: str | None = None
    """VAE folder or hub id, overriding <model>/vae."""
    text_encoder: str | None = None
    """Text encoder folder or hub id, overriding <model>/text_encoder."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id, overriding <model>/tokenizer."""
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    """Vision encoder and how its features are computed and stored."""
    skip_teacher: bool = field(default=False, metadata={"flag": "no-teacher"})
    """Cache latents and text only (for backbone-mode CREPA or plain fine-tuning)."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1 ..."""
    vae_dtype: str = field(default="auto", metadata={"choices": COMPUTE_DTYPES})
    """Compute dtype of the VAE (auto: bf16 on GPU, fp32 on CPU)."""
    encoder_dtype: str = field(default="auto", metadata={"choices": COMPUTE_DTYPES})
    """Compute dtype of the vision encoder."""
    text_encoder_dtype: str = field(default="auto", metadata={"choices": COMPUTE_DTYPES})
    """Compute dtype of the text encoder."""
    image_encoder_dtype: str = field(default="auto", metadata={"choices": COMPUTE_DTYPES})
    """Compute dtype of the pipeline's image encoder (image-to-video models that take image embeddings)."""
    latents_dtype: str = field(default="float32", metadata={"choices": STORAGE_DTYPES})
    """Storage dtype of the latents."""
    text_dtype: str = field(default="float16", metadata={"choices": STORAGE_DTYPES})
    """Storage dtype of the text embeddings."""
    latent_sampling: str = field(default="mode", metadata={"choices": LATENT_SAMPLING})
    """mode: the posterior's mode (deterministic); sample: a draw from it, seeded per clip."""
    seed: int = field(default=0, metadata={"min": 0})
    """Seed of the posterior draws in `sample` mode."""
    text_max_length: int | None = field(default=None, metadata={"min": 1})
    """Tokenizer max length (default: the family pipeline's)."""
    validation_prompts: str | None = None
    """Text file of prompts, one a line, to encode beside the captions for `crepa train --validation-prompts`
    (the empty prompt is always encoded)."""
    encoder_batch_size: int = field(default=16, metadata={"min": 1})
    """Frames per vision-encoder forward."""
    text_batch_size: int = field(default=16, metadata={"min": 1})
    """Captions per text-encoder forward."""
    vae_tiling: bool = False
    """Encode in spatial tiles to save memory (changes latents slightly, so it is part of the key)."""
    vae_slicing: bool = False
    """Encode clips of a batch one at a time."""
    offload: bool = False
    """Keep models on the CPU and move each to the device only for its own forward."""
    decode_workers: int = field(default=2, metadata={"min": 0})
    """Processes decoding clips ahead of the encoders (0 decodes inline)."""
    decode_timeout: float = field(default=120.0, metadata={"min": 0.0, "exclusive": True})
    """Seconds one clip may take to decode before it is skipped."""
    regenerate: bool = False
    """Recompute entries that already exist (the new ones win)."""
    dry_run: bool = False
    """Print what would be computed and how big it will be; compute nothing."""
    strict: bool = False
    """Stop at the first bad clip instead of skipping it."""
    max_segment_mb: int = field(default=256, metadata={"min": 1})
    """Size of one written segment (shard); at most this much is lost to a crash."""
    segment_clips: int = field(default=64, metadata={"min": 1})
    """Clips per written segment at most; 1 commits every clip as soon as it is encoded."""
    codec: str = field(default="zstd", metadata={"choices": CODECS})
    """Compression of the stored arrays: zstd, blosc or none (features barely compress; none reads fastest)."""

    def __post_init__(self) -> None:
        check_fields(self)
