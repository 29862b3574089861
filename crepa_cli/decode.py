"""`crepa decode RUN_DIR`: the run's validation latents -> mp4s, contact sheets and tensorboard images."""

from __future__ import annotations

import click

from crepa_cli.errors import UserErrorCommand
from crepa_cli.options import CONTEXT_SETTINGS
from precompute.config import COMPUTE_DTYPES


@click.command("decode", cls=UserErrorCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--model", help="Diffusers pipeline folder or hub id whose vae/ decodes (default: the run's --model).")
@click.option("--vae", help="VAE folder or hub id, overriding <model>/vae.")
@click.option("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
@click.option("--vae-dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              help="Compute dtype of the VAE (auto: bf16 on GPU, fp32 on CPU).")
@click.option("--fps", type=click.FloatRange(0, min_open=True), default=16.0, help="Frame rate of the mp4s.")
def decode_command(run_dir: str, model: str | None, vae: str | None, device: str, vae_dtype: str, fps: float) -> None:
    """Decode the validation samples a training run wrote (RUN_DIR/validation/step-N/) with the VAE alone."""
    decode_run(run_dir, model=model, vae=vae, device=device, dtype=vae_dtype, fps=fps)


def decode_run(run_dir: str, **options) -> None:
    """Decode and say where the videos and contact sheets went."""
    from train.validation_videos import decode_validation

    for step in decode_validation(run_dir, **options):
        click.echo(f"step {step.step}: {len(step.videos)} video(s), contact sheet {step.contact_sheet}")
