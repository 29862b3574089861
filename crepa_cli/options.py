"""Click options generated from a config dataclass: one source of names, defaults, choices and help.

Each field becomes `--<flag>` (see crepa.fields.flag_name) with the field's docstring as help, its
`metadata["choices"]` as a click.Choice and its `min`/`max` as a click range (--help shows e.g. [x>=1]). A field
holding another dataclass is flattened: its fields become options of their own, and `build_config` nests them
again. Booleans are `--x/--no-x`, unless the field names its
own flag in metadata, which makes a one-way switch (`skip_teacher` is `--no-teacher`). Lists are comma-separated,
except lists of a fixed length (`nargs`), whose values follow the flag (`--validation-size 81 480 832`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import click

from crepa.fields import base_type, field_docs, flag_aliases, flag_name

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


def _fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, typing.Any, type]]:
    """(parameter name, field, base type, owning class) of every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        kind = base_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            leaves += _fields(kind, f"{prefix}{field.name}_")
        else:
            leaves.append((f"{prefix}{field.name}", field, kind, cls))
    return leaves


def _default(field: dataclasses.Field) -> typing.Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _click_type(field: dataclasses.Field, kind: typing.Any) -> typing.Any:
    """The click type of a non-boolean leaf field: its choices, its range, or its plain type."""
    meta = field.metadata
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    if typing.get_origin(kind) is list:
        return _click_type(field, typing.get_args(kind)[0]) if "nargs" in meta else str
    if kind in (int, float) and ("min" in meta or "max" in meta):
        strict = meta.get("exclusive", False)
        number_range = click.IntRange if kind is int else click.FloatRange
        return number_range(meta.get("min"), meta.get("max"), min_open=strict, max_open=strict)
    return kind


def config_options(cls: type) -> Callable:
    """Decorator adding one click option per (leaf) field of the dataclass `cls`, in field order."""
    leaves = _fields(cls)
    docs = {owner: field_docs(owner) for _, _, _, owner in leaves}

    def decorate(command: Callable) -> Callable:
        for param, field, kind, owner in reversed(leaves):
            flag, help_text = flag_name(field), docs[owner].get(field.name, "")
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if kind is bool:
                switch = "flag" in field.metadata
                option = click.option(f"--{flag}" if switch else f"--{flag}/--no-{flag}", param, is_flag=True,
                                      default=_default(field), help=help_text)
            else:
                click_type = _click_type(field, kind)
                default = {} if required else {"default": _default(field)}  # click counts a None default as given
                names = [f"--{name}" for name in (flag, *flag_aliases(field))]
                values = {key: field.metadata[key] for key in ("nargs", "metavar") if key in field.metadata}
                option = click.option(*names, param, type=click_type, required=required, help=help_text, **default,
                                      **values)
            command = option(command)
        return command

    return decorate


def build_config(cls: type, values: dict[str, typing.Any], prefix: str = "") -> typing.Any:
    """`cls` from parameter values as `config_options` names them; comma-separated strings fill list fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        kind = base_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            kwargs[field.name] = build_config(kind, values, f"{prefix}{field.name}_")
            continue
        param = f"{prefix}{field.name}"
        if param not in values:
            continue
        value = values[param]
        if typing.get_origin(kind) is list and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, tuple):  # the values of an option with nargs
            value = list(value)
        kwargs[field.name] = value
    return cls(**kwargs)
