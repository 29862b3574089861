"""`crepa precompute`: one click option per PrecomputeConfig field -> run_precompute -> end-of-run tables."""

from __future__ import annotations

import click

from crepa_cli.errors import UserErrorCommand
from crepa_cli.options import CONTEXT_SETTINGS, build_config, config_options
from precompute.config import PrecomputeConfig


@click.command("precompute", cls=UserErrorCommand, context_settings=CONTEXT_SETTINGS)
@config_options(PrecomputeConfig)
def precompute_command(**options) -> None:
    """Decode clips, VAE-encode them, extract teacher features and text embeddings into a cache."""
    from precompute.pipeline import run_precompute
    from precompute.report import print_summary

    config = build_config(PrecomputeConfig, options)
    summary = run_precompute(config)
    print_summary(config, summary)
