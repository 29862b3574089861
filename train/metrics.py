"""Training metrics: tensorboard, a JSONL log and a PNG of the curves at the end."""

from __future__ import annotations

import json
import os

PLOTTED = ("loss", "loss_flow", "crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight", "lr",
           "grad_norm")


class MetricsLog:
    """Writes each logged step to tensorboard (when asked) and to metrics.jsonl.

    A run starting at `start_step` (0, or the step it resumed from) first drops the rows logged after it,
    so the steps it repeats are not logged twice.
    """

    def __init__(self, output_dir: str, report_to: str, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if enabled and os.path.exists(self.path):
            _cut(self.path, start_step)
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "logs"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _cut(path: str, step: int) -> None:
    """Keep the rows up to `step`; written aside and renamed, so a crash keeps the old log."""
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(f"{path}.tmp", path)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, png_path: str) -> str:
    """One panel per logged quantity against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    names = [name for name in PLOTTED if any(name in row for row in rows)]
    columns = 2
    fig, axes = plt.subplots((len(names) + 1) // columns, columns, figsize=(10, 2.6 * ((len(names) + 1) // columns)),
                             squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        points = [(row["step"], row[name]) for row in rows if name in row]
        axis.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
