"""`crepa train`: one click option per TrainConfig field, merged over an optional --config file."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

import click
from click.core import ParameterSource

from train.config import TrainConfig, read_config_file


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, used as its --help text."""
    docs, previous = {}, None
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = str(node.value.value)
            previous = None
    return docs


def _click_type(annotation: typing.Any) -> tuple[typing.Any, bool]:
    """(click type, is_flag) for a field annotation such as `int | None` or `bool`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base is bool:
        return bool, True
    if typing.get_origin(base) is list:
        return str, False  # comma-separated
    return base, False


def train_options(command):
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs(TrainConfig)
    for field in reversed(dataclasses.fields(TrainConfig)):
        kind, is_flag = _click_type(hints[field.name])
        flag = field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = docs.get(field.name, "")
        if is_flag:
            command = click.option(f"--{flag}/--no-{flag}", field.name, default=default, help=help_text)(command)
        else:
            command = click.option(f"--{flag}", field.name, type=kind, default=default, help=help_text)(command)
    return command


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML/JSON with any of these options (e.g. a previous run's train_config.json).")
@train_options
@click.pass_context
def train_command(ctx: click.Context, config_file: str | None, **options) -> None:
    """Train the transformer (LoRA or full) on a cache with flow matching + CREPA."""
    from train.trainer import run_train

    merged = read_config_file(config_file) if config_file else {}
    for name, value in options.items():
        if config_file is None or ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            merged[name] = value
    if isinstance(merged.get("lora_target_modules"), str):
        merged["lora_target_modules"] = [m.strip() for m in merged["lora_target_modules"].split(",") if m.strip()]
    result = run_train(TrainConfig(**merged))
    if result.lora_path:
        click.echo(f"LoRA: {result.lora_path}")
    if result.projector_path:
        click.echo(f"projector: {result.projector_path}")
    if result.plot_path:
        click.echo(f"curves: {result.plot_path}")
