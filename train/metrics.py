"""Training metrics: a JSONL log, the tracker asked for (through accelerate) and a PNG of the curves at the end."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from crepa.errors import UserError

if TYPE_CHECKING:
    from train.config import TrainConfig

PLOTTED = ("loss", "loss_flow", "crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight", "lr",
           "grad_norm")


def tracker_options(cfg: TrainConfig) -> dict:
    """`Accelerator` keyword arguments that send `accelerator.log` to the `--report-to` tracker ({} for none).

    Checked before the run starts: accelerate itself only warns when the tracker's package is missing.
    """
    if cfg.report_to == "none":
        return {}
    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("--report-to wandb needs the wandb package, which is not installed",
                        fix="pip install wandb (then `wandb login`, or set WANDB_MODE=offline), "
                            "or use --report-to tensorboard or none")
    from accelerate.utils import ProjectConfiguration

    return {"log_with": cfg.report_to,
            "project_config": ProjectConfiguration(project_dir=cfg.output_dir,
                                                   logging_dir=os.path.join(cfg.output_dir, "logs"))}


class MetricsLog:
    """Writes each logged step to metrics.jsonl and to the accelerator's trackers (`tracker_options`), as train/<name>.

    A run starting at `start_step` (0, or the step it resumed from) first drops the rows logged after it,
    so the steps it repeats are not logged twice (tensorboard likewise purges the events after it).
    `accelerator.end_training()` closes the trackers.
    """

    def __init__(self, cfg: TrainConfig, accelerator, start_step: int = 0):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if self.enabled and os.path.exists(self.path):
            _cut(self.path, start_step)
        run_name = os.path.basename(os.path.abspath(cfg.output_dir))
        accelerator.init_trackers(cfg.tracker_project, config=hyperparameters(cfg),
                                  init_kwargs={"tensorboard": {"purge_step": start_step + 1},
                                               "wandb": {"name": run_name}})

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log({f"train/{name}": value for name, value in values.items()}, step=step)


def hyperparameters(cfg: TrainConfig) -> dict:
    """The run's options as trackers take them: lists joined with commas, unset options left out."""
    return {name: ",".join(map(str, value)) if isinstance(value, list) else value
            for name, value in asdict(cfg).items() if value is not None}


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
