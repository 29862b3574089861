"""The `crepa` command group: parses options, builds a config, calls one run_* function of a stage."""

from __future__ import annotations

import json
import logging

import click

from crepa import __version__
from crepa_cli.errors import DEBUG_ENV, UserErrorGroup
from crepa_cli.options import CONTEXT_SETTINGS


@click.group(cls=UserErrorGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="crepa")
@click.option("--debug", is_flag=True, help=f"Show the full traceback of every error (also: {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """Fine-tune video DiTs with CREPA from a precomputed teacher cache."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _add_stage_commands() -> None:
    from crepa_cli.decode import decode_command
    from crepa_cli.precompute import precompute_command
    from crepa_cli.train import train_command

    main.add_command(precompute_command)
    main.add_command(train_command)
    main.add_command(decode_command)


@main.group("cache", cls=UserErrorGroup)
def cache_group() -> None:
    """Inspect, check and export a feature cache."""


@cache_group.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def cache_info(cache: str, as_json: bool) -> None:
    """List the feature sets, entries per bucket and bytes."""
    from crepa.cache.store import CacheStore
    from precompute.report import bucket_table

    store = CacheStore.open(cache)
    if as_json:
        click.echo(json.dumps({"plans": {k: {**v, "clips": len(v["clips"])} for k, v in store.plans().items()},
                               "feature_sets": store.info()}, indent=2, default=str))
        return
    for name, plan in sorted(store.plans().items()):
        click.echo(f"plan {name}: family {plan['family']}, {len(plan['clips'])} clips")
    for line in bucket_table(store):
        click.echo(line)


@cache_group.command("verify")
@click.argument("cache")
def cache_verify(cache: str) -> None:
    """Re-read every committed entry and check its shape, dtype and checksum."""
    from crepa.cache.store import CacheStore

    report = CacheStore.open(cache).verify(progress=True)
    for orphan in report.orphans:
        click.echo(f"orphan (uncommitted, ignored): {orphan}")
    for problem in report.problems:
        click.echo(f"PROBLEM: {problem}")
    click.echo(f"checked {report.checked} entries: {'ok' if report.ok else f'{len(report.problems)} problems'}")
    if not report.ok:
        raise SystemExit(1)


@cache_group.command("repair")
@click.argument("cache")
def cache_repair(cache: str) -> None:
    """Remove the entries `crepa cache verify` flags, so the next `crepa precompute` recomputes exactly them."""
    from crepa.cache.store import CacheStore

    CacheStore.open(cache)  # a missing cache is an error here, not a new empty one
    report = CacheStore.open(cache, mode="a").repair(progress=True)
    if not report.removed:
        click.echo(f"checked {report.checked} entries: nothing to repair")
        return
    for line in report.removed:
        click.echo(f"removed: {line}")
    click.echo(f"removed {len(report.removed)} damaged entries; recompute them (only them) with:")
    for config, family in sorted(report.configs.items()):
        click.echo(f"  crepa precompute --config {config} --family {family} --out {cache} "
                   "(plus the model, encoder and teacher options that made the cache)")


@cache_group.command("export")
@click.argument("cache")
@click.argument("out_dir")
@click.option("--format", "fmt", type=click.Choice(["wds"]), default="wds", help="Export format.")
@click.option("--family", help="Family whose training view is exported (default: the cache's only family).")
@click.option("--encoder", help="Teacher set to include (needed when the cache holds several).")
@click.option("--no-teacher", is_flag=True, help="Export latents and text only.")
@click.option("--maxcount", default=1000, type=int, help="Samples per shard.")
@click.option("--maxsize", default=2**30, type=int, help="Bytes per shard.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in OUT_DIR (its old shards are removed).")
def cache_export(cache: str, out_dir: str, fmt: str, family: str | None, encoder: str | None, no_teacher: bool,
                 maxcount: int, maxsize: int, overwrite: bool) -> None:
    """Write the training view as webdataset tar shards (one sample per clip) and their index shards.json."""
    from crepa.cache.export import export_view

    shards = export_view(cache, out_dir, family=family, encoder=encoder, with_teacher=not no_teacher,
                         maxcount=maxcount, maxsize=maxsize, overwrite=overwrite)
    click.echo(f"wrote {len(shards)} shards and their index to {out_dir}")


@cache_group.command("index")
@click.argument("shards")
def cache_index(shards: str) -> None:
    """Count the samples of the *.tar shards in SHARDS (a folder or URL) into its shards.json index."""
    from crepa.cache.wds import write_index_for

    index = write_index_for(shards)
    click.echo(f"{index.url}: {len(index.urls)} shards, {sum(index.nsamples)} samples")


@main.command("demo")
@click.option("--workdir", default="demo_run", type=click.Path(file_okay=False), help="Where everything is written.")
@click.option("--family", default="wan", help="Model family of the tiny models.")
def demo(workdir: str, family: str) -> None:
    """Tiny random models + generated clips -> precompute -> train, all local."""
    from crepa_cli.demo import run_demo

    run_demo(workdir, family)


_add_stage_commands()

if __name__ == "__main__":
    main()
