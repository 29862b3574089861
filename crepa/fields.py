"""Config dataclass fields as options: their flag names, help text and allowed values, in one place.

A field's option name is its name with dashes, unless `metadata["flag"]` names it otherwise (the stages keep
short, established flags such as --config). The metadata is the schema of the field's value, read both by the
config's own validation (`check_fields`, called from `__post_init__`) and by the command line (choices and ranges
in --help), so the two cannot disagree:

- `choices`: the allowed values;
- `min` / `max`: the range of a number (of each item of a list of numbers), inclusive unless `exclusive` is true
  (then both bounds are open);
- `nargs`: the exact length of a list of numbers, given as that many values after its flag (`metavar` names them);
- `aliases`: other names of the option (with dashes), the established names of other trainers, accepted on the
  command line and, with underscores, in config files.

The type comes from the annotation (`int`, `float`, `bool`, `str`, `list[str]`, `list[int]`, each optionally
`| None`); floats must be finite.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing

from crepa.errors import UserError

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def flag_name(field: dataclasses.Field) -> str:
    """The option's name without dashes in front, e.g. "encoder-image-size"."""
    return field.metadata.get("flag", field.name.replace("_", "-"))


def flag_aliases(field: dataclasses.Field) -> tuple[str, ...]:
    """Other names of the option, without dashes in front, e.g. ("checkpointing-steps",)."""
    return tuple(field.metadata.get("aliases", ()))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, used as its --help text."""
    docs, previous = {}, None
    for node in ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = str(node.value.value)
            previous = None
    return docs


def base_type(annotation: typing.Any) -> typing.Any:
    """`int | None` -> int; other annotations unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args and typing.get_origin(annotation) is not list else annotation


def range_text(metadata: typing.Mapping) -> str | None:
    """The range as click's --help shows it ("x>=1", "0<x<1"); None for a field without one."""
    low, high, strict = metadata.get("min"), metadata.get("max"), metadata.get("exclusive", False)
    op = "<" if strict else "<="
    if low is None and high is None:
        return None
    if high is None:
        return f"x{'>' if strict else '>='}{low}"
    return f"{'' if low is None else f'{low}{op}'}x{op}{high}"


def check_fields(config: object) -> None:
    """Raise one clear error for the first field whose value has the wrong type, choice or range.

    Whole numbers given for a float field (`learning_rate = 1` in TOML) are stored as floats.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        kind = base_type(hints[field.name])
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(kind) or (value is None and kind is not hints[field.name]):
            continue  # a nested config checks itself; None is allowed where the annotation says `| None`
        value = _typed(field, kind, value)
        setattr(config, field.name, value)
        _check_choice(field, value)
        _check_range(field, value)


def _typed(field: dataclasses.Field, kind: typing.Any, value: typing.Any) -> typing.Any:
    """`value` as `kind` (an int for a float field becomes a float), or an error naming the expected type."""
    if typing.get_origin(kind) is list:
        (item_kind,) = typing.get_args(kind)
        count = field.metadata.get("nargs")
        ok = isinstance(value, list | tuple) and (count is None or len(value) == count)
        ok = ok and all(isinstance(item, item_kind) and not isinstance(item, bool) for item in value)
        value = list(value) if ok else value
        expected = f"a list of {count or ''} {_TYPE_NAMES[item_kind].removeprefix('an ').removeprefix('a ')}s"
        expected = expected.replace("  ", " ")
    else:
        numeric = kind is float and isinstance(value, int)
        ok = not isinstance(value, bool) or kind is bool
        ok = ok and (isinstance(value, kind) or numeric)
        expected = _TYPE_NAMES.get(kind, kind.__name__)
        if ok and kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"--{flag_name(field)} must be a finite number, got {value}",
                                fix=f"use a finite value{_range_hint(field)}")
    if not ok:
        raise UserError(f"{field.name} must be {expected}, got {value!r}",
                        fix=f"set --{flag_name(field)} (`{field.name}` in a config file) to {expected}"
                            f"{_range_hint(field)}")
    return value


def _check_choice(field: dataclasses.Field, value: typing.Any) -> None:
    allowed = field.metadata.get("choices")
    if allowed is not None and value not in allowed:
        raise UserError(f"--{flag_name(field)}={value!r}; use one of {', '.join(allowed)}")


def _check_range(field: dataclasses.Field, value: typing.Any) -> None:
    if isinstance(value, list):
        for item in value:
            _check_range(field, item)
        return
    low, high = field.metadata.get("min"), field.metadata.get("max")
    strict = field.metadata.get("exclusive", False)
    below = low is not None and (value <= low if strict else value < low)
    above = high is not None and (value >= high if strict else value > high)
    if below or above:
        raise UserError(f"--{flag_name(field)}={value} is out of range {range_text(field.metadata)}",
                        fix=f"use a value{_range_hint(field)}")


def _range_hint(field: dataclasses.Field) -> str:
    text = range_text(field.metadata)
    return f" with {text}" if text else ""
