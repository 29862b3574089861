"""Configuration and input errors become one line (`Error: ...`, exit status 1) instead of a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad options, missing files and unreadable inputs are the user's to fix: show the message, not the stack."""
    try:
        yield
    except (ValueError, FileNotFoundError, OSError) as error:
        raise click.ClickException(str(error)) from error


class UserErrorCommand(click.Command):
    """A stage command that reports bad input in one line, also when run on its own (`python -m train`)."""

    def invoke(self, ctx: click.Context):
        with one_line_errors():
            return super().invoke(ctx)


class UserErrorGroup(click.Group):
    """The same for a command group and the commands under it."""

    def invoke(self, ctx: click.Context):
        with one_line_errors():
            return super().invoke(ctx)
