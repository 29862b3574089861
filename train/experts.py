"""Denoiser sets: pipelines that split the timestep range between transformers (Wan 2.2 A14B's two experts).

diffusers' two-stage pipelines hold `transformer` (high noise) and `transformer_2` (low noise) and a `boundary_ratio`
in model_index.json; at inference, timestep t >= boundary_ratio * num_train_timesteps goes to `transformer` and the
rest to `transformer_2` (WanPipeline.__call__). Training follows the same split, read from the same config, for any
family: each trained transformer only sees noise levels of its own range (sigma = t / num_train_timesteps).

With several experts in one run, each optimizer step trains one of them, chosen from (seed, step) alone: the step
draws one noise level from the run's sigma density and the expert whose range holds it trains; every clip of the
step then draws its own noise level from the same density restricted to that range. Over the run each expert trains
on the share of steps its range holds of the density, and the mixture of the draws is exactly the unrestricted
density. All micro-batches and all ranks of a step use the same expert, so gradient accumulation and DDP see one
model per step, and N processes still train what one process with N times the accumulation trains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.loading import config_file
from train.flow_matching import TimestepSampling, clip_generator

EXPERTS = ("high", "low", "both")
PRIMARY = "transformer"
"""The pipeline component every diffusers pipeline has; files of another component carry its name as a suffix."""


@dataclass(frozen=True)
class Stage:
    """One transformer of the pipeline and the noise levels it denoises."""

    component: str
    """Pipeline subfolder: `transformer` or `transformer_2`."""
    name: str
    """What --expert calls it: `high` or `low` (noise); `all` in a pipeline of one transformer."""
    sigma_range: tuple[float, float]
    """It denoises sigma in [low, high) (the top stage up to 1 included); (0, 1) is the whole range."""

    def describe(self) -> str:
        low, high = self.sigma_range
        if self.name == "all":
            return self.component
        bound = f">= {low:g}" if high == 1.0 else f"< {high:g}"
        return f"{self.component} ({self.name} noise, sigma {bound})"


def pipeline_stages(model: str) -> list[Stage]:
    """The pipeline's transformers with their ranges, from its model_index.json (`transformer_2`, `boundary_ratio`).

    A pipeline without both (every one-transformer pipeline, or a folder without model_index.json) has one stage
    over the whole range.
    """
    path = config_file(model, "", "model_index.json")
    index = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    ratio, second = index.get("boundary_ratio"), index.get("transformer_2")
    if ratio is None or not isinstance(second, list) or second[0] is None:  # an absent component is [null, null]
        return [Stage(PRIMARY, "all", (0.0, 1.0))]
    if not 0.0 < ratio < 1.0:
        raise UserError(f"boundary_ratio {ratio} of {path} is outside (0, 1)", where=path,
                        fix="set it to the fraction of the timestep range where transformer takes over")
    return [Stage(PRIMARY, "high", (float(ratio), 1.0)), Stage("transformer_2", "low", (0.0, float(ratio)))]


def training_stages(model: str, expert: str | None) -> list[Stage]:
    """The stages `--expert` picks: every stage of the pipeline by default, `high`, `low` or `both`."""
    stages = pipeline_stages(model)
    if expert is None:
        return stages
    if len(stages) == 1:
        raise UserError(f"--expert {expert}: the pipeline {model} has one transformer (its model_index.json names "
                        "no transformer_2 with a boundary_ratio)", fix="drop --expert")
    return stages if expert == "both" else [s for s in stages if s.name == expert]


@dataclass
class Denoiser:
    """A trained transformer (as prepared for training), its CREPA projector and its stage."""

    stage: Stage
    transformer: nn.Module
    projector: nn.Module | None

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """The range its noise levels are drawn in; None for the whole range (the plain draw)."""
        return None if self.stage.sigma_range == (0.0, 1.0) else self.stage.sigma_range


class DenoiserSet:
    """The denoisers one run trains, and which of them trains at each step."""

    def __init__(self, denoisers: list[Denoiser]):
        self.denoisers = denoisers

    def __iter__(self):
        return iter(self.denoisers)

    def __len__(self) -> int:
        return len(self.denoisers)

    def describe(self) -> str:
        return ", ".join(d.stage.describe() for d in self.denoisers)

    def index_at(self, seed: int, step: int, sampling: TimestepSampling) -> int:
        """The denoiser that trains at `step`: the one whose range holds the step's own draw from the density."""
        if len(self.denoisers) == 1:
            return 0
        return self.index_of(float(sampling.sample(1, clip_generator(seed, step, "denoiser", torch.device("cpu")))))

    def index_of(self, sigma: float) -> int:
        """The denoiser whose range holds the noise level `sigma`."""
        for index, denoiser in enumerate(self.denoisers):
            low, high = denoiser.stage.sigma_range
            if low <= sigma < high or sigma == high == 1.0:
                return index
        raise ValueError(f"sigma {sigma} lies in no trained range ({self.describe()})")


def component_file(name: str, component: str) -> str:
    """`name` for the pipeline's `transformer`; `<stem>_<component><ext>` for another (`transformer_2`)."""
    if component == PRIMARY:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}_{component}{ext}"
