"""Config dataclass fields as options: their flag names, help text and allowed values, in one place.

A field's option name is its name with dashes, unless `metadata["flag"]` names it otherwise (the stages keep
short, established flags such as --config). `metadata["choices"]` lists the allowed values; the config's own
validation (`check_choices`) and the command line both read them from there, so they cannot disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

from crepa.errors import UserError


def flag_name(field: dataclasses.Field) -> str:
    """The option's name without dashes in front, e.g. "encoder-image-size"."""
    return field.metadata.get("flag", field.name.replace("_", "-"))


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


def check_choices(config: object) -> None:
    """Raise one clear error for the first field whose value is not among its `choices`."""
    for field in dataclasses.fields(config):
        allowed = field.metadata.get("choices")
        value = getattr(config, field.name)
        if allowed is not None and value not in allowed:
            raise UserError(f"--{flag_name(field)}={value!r}; use one of {', '.join(allowed)}")
