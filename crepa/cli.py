"""The `crepa` command line: parses options, builds a config, calls one run_* function."""

from __future__ import annotations

import click

from crepa import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="crepa")
def main() -> None:
    """Fine-tune video DiTs with CREPA from a precomputed teacher cache."""


if __name__ == "__main__":
    main()
