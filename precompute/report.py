"""End-of-run tables: what was computed, what each bucket holds, what was skipped and why."""

from __future__ import annotations

import click

from crepa.cache.store import CacheStore
from precompute.config import PrecomputeConfig
from precompute.pipeline import PrecomputeSummary

KINDS = ("text", "latents", "teacher", "condition")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def bucket_table(store: CacheStore) -> list[str]:
    """One line per (feature set, bucket): entries and stored bytes."""
    lines = [f"{'kind':9} {'set':16} {'encoder/model':24} {'group':22} {'entries':>8} {'bytes':>11}"]
    for fingerprint, item in sorted(store.info().items(), key=lambda kv: (kv[1]["attrs"]["kind"], kv[0])):
        attrs = item["attrs"]
        model = attrs.get("encoder") or attrs.get("vae") or attrs.get("text_encoder") or attrs.get("model")
        name = str(model or "")[-24:]
        for group, stats in sorted(item["groups"].items()):
            lines.append(f"{attrs['kind']:9} {fingerprint:16} {name:24} {group:22} {stats['entries']:>8} "
                         f"{human_bytes(stats['bytes']):>11}")
    return lines


def skip_counts(summary: PrecomputeSummary) -> str:
    """The skips a user may not expect, counted so they stand out: e.g. " (2 empty captions, 1 duplicate)"."""
    reasons = [item.reason for item in summary.skipped]
    counts = [(sum(r.startswith("empty caption") for r in reasons), "empty caption", "empty captions"),
              (sum(r.startswith("duplicate of") for r in reasons), "duplicate", "duplicates")]
    parts = [f"{count} {one if count == 1 else many}" for count, one, many in counts if count]
    return f" ({', '.join(parts)})" if parts else ""


def planned_line(summary: PrecomputeSummary) -> str:
    """"5 clips planned", with how many are images when some are: "5 clips planned (2 of them images)"."""
    images = f" ({summary.planned_images} of them image{'s' * (summary.planned_images != 1)})"
    return f"{summary.planned} clips planned" + (images if summary.planned_images else "")


def print_summary(config: PrecomputeConfig, summary: PrecomputeSummary) -> None:
    echo = click.echo
    if config.dry_run:
        echo(f"dry run: {planned_line(summary)}")
        for kind in (k for k in KINDS if k in summary.computed):
            size = summary.estimated_bytes.get(kind)
            extra = f", about {human_bytes(size)} uncompressed" if size else ""
            echo(f"  {kind:9} to compute {summary.computed.get(kind, 0):6}  already cached "
                 f"{summary.reused.get(kind, 0):6}{extra}")
        return
    echo(planned_line(summary))
    for kind in (k for k in KINDS if k in summary.computed):  # condition: image-to-video models only
        echo(f"  {kind:9} computed {summary.computed.get(kind, 0):6}  reused {summary.reused.get(kind, 0):6}")
    if summary.forward_seconds:
        forwards = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(summary.forward_seconds.items()))
        echo(f"wall {summary.wall_seconds:.1f}s (model loading {sum(summary.load_seconds.values()):.1f}s); "
             f"model forwards {forwards}; efficiency {summary.efficiency:.2f}")
    echo("")
    for line in bucket_table(CacheStore.open(config.out)):
        echo(line)
    if summary.skipped:
        echo(f"\nskipped {len(summary.skipped)}{skip_counts(summary)}:")
        for item in summary.skipped:
            echo(f"  {item.source}: {item.reason}")
