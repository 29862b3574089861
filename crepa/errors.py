"""The one error type for mistakes in what the user gave: a path, an option, a config, a clip, a cache."""

from __future__ import annotations


class UserError(ValueError):
    """Shown as one line, without a traceback: `<what> in <where>: <fix>`.

    A ValueError, so callers that guard against bad values keep working; anything else that escapes to the
    command line is a bug and keeps its traceback.
    """

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what + (f" in {where}" if where else "") + (f": {fix}" if fix else ""))
        self.what, self.where, self.fix = what, where, fix
