"""The command line's one edge for errors: a user's mistake is one line, a bug keeps its traceback.

`Error: <what> in <where>: <fix>`, exit status 1, for a UserError and for an OSError (a path that is missing,
not permitted, read-only or out of space). Anything else is a bug in this program and is raised with its
traceback, as is everything under `crepa --debug` or CREPA_DEBUG=1 (which `python -m train` and
`python -m precompute` also honour). Click's own usage errors keep click's message and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

import click

from crepa.errors import UserError

DEBUG_ENV = "CREPA_DEBUG"
# Options naming where a command writes, so that a full disk without a file name still names a folder.
_OUTPUT_OPTIONS = ("out", "output_dir", "out_dir", "workdir")


def debug_enabled(ctx: click.Context | None) -> bool:
    """True under `crepa --debug` or CREPA_DEBUG=1."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def os_error_message(error: OSError, ctx: click.Context | None = None) -> str:
    """One line saying which path failed, why, and what to do about it."""
    path = error.filename
    if error.errno is None or (path is None and error.errno != errno.ENOSPC):
        return str(error)  # raised here with a full message, or about no path at all
    if error.errno == errno.ENOENT:
        return str(UserError(f"{path} does not exist", fix="check the path"))
    if error.errno in (errno.EACCES, errno.EPERM):
        return str(UserError(f"permission denied for {path}",
                             fix="change its permissions or use a path you may read and write"))
    if error.errno == errno.EROFS:
        return str(UserError(f"{path} is on a read-only file system", fix="write somewhere else (another --out / "
                                                                           "--output-dir)"))
    if error.errno == errno.ENOSPC:
        folder = path or _output_folder(ctx)
        free = _free_bytes(folder) if folder else None
        return str(UserError("no space left on the device", where=folder,
                             fix=("" if free is None else f"{free / 2**30:.1f} GiB are free there; ")
                             + "free space or write somewhere else (another --out / --output-dir)"))
    return str(UserError(f"{path}: {error.strerror}"))


def _output_folder(ctx: click.Context | None) -> str | None:
    while ctx is not None:
        for name in _OUTPUT_OPTIONS:
            if ctx.params.get(name):
                return str(ctx.params[name])
        ctx = ctx.parent
    return None


def _free_bytes(path: str) -> int | None:
    """Free bytes on the device holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def one_line_errors(ctx: click.Context | None = None) -> Iterator[None]:
    """Bad options, missing files and unreadable inputs are the user's to fix: show the message, not the stack."""
    try:
        yield
    except UserError as error:
        if debug_enabled(ctx):
            raise
        raise click.ClickException(str(error)) from error
    except OSError as error:
        if debug_enabled(ctx):
            raise
        raise click.ClickException(os_error_message(error, ctx)) from error


class UserErrorCommand(click.Command):
    """A stage command that reports bad input in one line, also when run on its own (`python -m train`)."""

    def invoke(self, ctx: click.Context):
        with one_line_errors(ctx):
            return super().invoke(ctx)


class UserErrorGroup(click.Group):
    """The same for a command group and the commands under it."""

    def invoke(self, ctx: click.Context):
        with one_line_errors(ctx):
            return super().invoke(ctx)
