"""`crepa train`: one click option per TrainConfig field, merged over an optional --config file."""

from __future__ import annotations

import click
from click.core import ParameterSource

from crepa.errors import UserError
from crepa_cli.decode import decode_run
from crepa_cli.errors import UserErrorCommand
from crepa_cli.options import CONTEXT_SETTINGS, build_config, config_options
from train.config import TrainConfig, read_config_file


@click.command("train", cls=UserErrorCommand, context_settings=CONTEXT_SETTINGS)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML/JSON with any of these options (e.g. a previous run's train_config.json).")
@config_options(TrainConfig)
@click.pass_context
def train_command(ctx: click.Context, config_file: str | None, **options) -> None:
    """Train the transformer (LoRA or full) on a cache with flow matching + CREPA."""
    from train.trainer import run_train

    from_file = read_config_file(config_file) if config_file else {}
    merged = dict(from_file)
    for name, value in options.items():
        if config_file is None or ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            merged[name] = value
    config = _build(merged, from_file, config_file)
    result = run_train(config)
    if result.lora_path:
        click.echo(f"LoRA: {result.lora_path}")
    if result.projector_path:
        click.echo(f"projector: {result.projector_path}")
    if result.plot_path:
        click.echo(f"curves: {result.plot_path}")
    if config.decode_validation and result.validation_dir:  # the main process, once the transformer is freed
        decode_run(config.output_dir)


def _build(merged: dict, from_file: dict, config_file: str | None) -> TrainConfig:
    """The run's config; a mistake that is in the --config file alone names that file."""
    try:
        return build_config(TrainConfig, merged)
    except UserError as error:
        try:
            build_config(TrainConfig, from_file)
        except UserError as file_error:
            if file_error.what == error.what:  # the file's value reached the run: name the file
                raise UserError(file_error.what, where=config_file, fix=file_error.fix) from None
        raise error
