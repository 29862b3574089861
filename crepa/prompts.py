"""Prompts besides the clips' captions that a cache's text set holds: the empty prompt and validation prompts.

Precompute encodes them like captions (same text key, same text set); training looks them up by their text:
the empty prompt replaces a dropped caption and is the unconditional branch of classifier-free guidance, as the
families' pipelines use `negative_prompt=""`.
"""

from __future__ import annotations

import os

from crepa.errors import UserError

EMPTY_PROMPT = ""
"""What a pipeline encodes for `negative_prompt=""`: the unconditional text of classifier-free guidance."""


def read_prompts(path: str, option: str = "--validation-prompts") -> list[str]:
    """The prompts of a text file, one a line, surrounding whitespace removed and blank lines skipped."""
    if not os.path.isfile(path):
        raise UserError(f"{option} {path} does not exist", fix="pass a text file with one prompt a line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise UserError(f"{option} {path} holds no prompt", fix="write one prompt a line")
    return prompts
