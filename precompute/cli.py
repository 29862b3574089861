"""`crepa precompute`: options -> PrecomputeConfig -> run_precompute -> end-of-run tables."""

from __future__ import annotations

import click

from crepa.cache.store import CODECS
from precompute.config import (
    RESIZE_MODES,
    TEACHER_DTYPES,
    TEACHER_FRAMES,
    TEACHER_INPUTS,
    PrecomputeConfig,
    TeacherSettings,
)

DTYPE_CHOICES = click.Choice(["auto", "float32", "bfloat16", "float16"])


@click.command("precompute")
@click.option("--config", "dataset_config", required=True, type=click.Path(dir_okay=False),
              help="Dataset TOML ([general] + [[datasets]]).")
@click.option("--family", required=True, help="Model family: wan.")
@click.option("--model", help="Diffusers pipeline folder or hub id (vae/, text_encoder/, tokenizer/).")
@click.option("--vae", help="VAE folder or hub id, instead of <model>/vae.")
@click.option("--text-encoder", help="Text encoder folder or hub id, instead of <model>/text_encoder.")
@click.option("--tokenizer", help="Tokenizer folder or hub id, instead of <model>/tokenizer.")
@click.option("--out", required=True, help="Cache directory or fsspec URL (file://, memory://, s3://...).")
@click.option("--encoder", default="dinov2_vitg14",
              help="Vision encoder: dinov2_vit{s,b,l,g}14[_reg], hub id or folder.")
@click.option("--encoder-image-size", default=518, type=int, help="Encoder input side (about this^2 pixels).")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default="aspect", help="Encoder input shape.")
@click.option("--teacher-frames", type=click.Choice(TEACHER_FRAMES), default="stride",
              help="Which pixel frames make a latent frame's teacher.")
@click.option("--teacher-input", type=click.Choice(TEACHER_INPUTS), default="pixels",
              help="Encode source pixels or the VAE reconstruction.")
@click.option("--teacher-dtype", type=click.Choice(TEACHER_DTYPES), default="float16",
              help="Teacher storage dtype (int8: per-token scale beside, half of float16's bytes).")
@click.option("--teacher-pool", default=1, type=int, help="Average-pool the patch grid by this factor.")
@click.option("--no-teacher", is_flag=True, help="Cache latents and text only.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--vae-dtype", type=DTYPE_CHOICES, default="auto")
@click.option("--encoder-dtype", type=DTYPE_CHOICES, default="auto")
@click.option("--text-encoder-dtype", type=DTYPE_CHOICES, default="auto")
@click.option("--latents-dtype", type=click.Choice(["float32", "float16"]), default="float32")
@click.option("--text-dtype", type=click.Choice(["float32", "float16"]), default="float16")
@click.option("--latent-sampling", type=click.Choice(["mode", "sample"]), default="mode")
@click.option("--seed", default=0, type=int, help="Seed of posterior draws with --latent-sampling sample.")
@click.option("--text-max-length", type=int, help="Tokenizer max length (default: the family's).")
@click.option("--encoder-batch-size", default=16, type=int, help="Frames per encoder forward.")
@click.option("--text-batch-size", default=16, type=int, help="Captions per text-encoder forward.")
@click.option("--vae-tiling", is_flag=True, help="Tiled VAE encode (less memory).")
@click.option("--vae-slicing", is_flag=True, help="Sliced VAE encode.")
@click.option("--offload", is_flag=True, help="Keep models on CPU; move each to the device for its forward.")
@click.option("--decode-workers", default=2, type=int, help="Decoding processes (0: inline).")
@click.option("--decode-timeout", default=120.0, type=float, help="Seconds before a clip's decode is abandoned.")
@click.option("--regenerate", is_flag=True, help="Recompute entries that already exist.")
@click.option("--dry-run", is_flag=True, help="Show what would be computed and its size; compute nothing.")
@click.option("--strict", is_flag=True, help="Stop at the first bad clip instead of skipping it.")
@click.option("--max-segment-mb", default=256, type=int, help="Segment (shard) size; bounds what a crash loses.")
@click.option("--segment-clips", default=64, type=int, help="Clips per segment at most (1: commit every clip).")
@click.option("--codec", type=click.Choice(CODECS), default="zstd",
              help="Compression of the stored arrays (none reads fastest; features barely compress).")
def precompute_command(**options) -> None:
    """Decode clips, VAE-encode them, extract teacher features and text embeddings into a cache."""
    from precompute.pipeline import run_precompute
    from precompute.report import print_summary

    teacher = TeacherSettings(
        encoder=options.pop("encoder"), image_size=options.pop("encoder_image_size"), resize=options.pop("resize"),
        frames=options.pop("teacher_frames"), input=options.pop("teacher_input"), dtype=options.pop("teacher_dtype"),
        pool=options.pop("teacher_pool"),
    )
    config = PrecomputeConfig(teacher=teacher, skip_teacher=options.pop("no_teacher"), **options)
    summary = run_precompute(config)
    print_summary(config, summary)
