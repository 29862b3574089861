"""The CREPA weight lambda(step): warmup, decay, hard cutoff and a similarity-threshold cutoff."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from crepa.errors import UserError

SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")


@dataclass
class CrepaScheduleConfig:
    """How the CREPA weight evolves with the optimizer step."""

    weight: float = 0.5
    """lambda at the end of warmup (crepa_lambda)."""
    scheduler: str = "constant"
    """constant | linear | cosine | polynomial decay from `weight` to `weight_end`."""
    weight_end: float = 0.0
    """lambda reached at `decay_steps` by the decaying schedulers (crepa_lambda_end)."""
    decay_steps: int = 0
    """Absolute step at which the decay reaches `weight_end`; required by decaying schedulers."""
    power: float = 1.0
    """Exponent of the polynomial decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    cutoff_step: int = 0
    """From this absolute step on the weight is 0 (0 disables the cutoff)."""
    similarity_threshold: float | None = None
    """Turn CREPA off once the EMA of the alignment score exceeds this (None disables)."""
    similarity_ema_decay: float = 0.99
    """Decay of that EMA."""
    threshold_mode: str = "permanent"
    """permanent: off for good once crossed; recoverable: back on when the EMA drops below."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"crepa_scheduler={self.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise UserError(
                f"crepa_threshold_mode={self.threshold_mode!r} is unknown; choose one of {', '.join(THRESHOLD_MODES)}"
            )
        if self.scheduler != "constant" and self.decay_steps <= self.warmup_steps:
            raise UserError(
                f"crepa_scheduler={self.scheduler} needs crepa_decay_steps > crepa_warmup_steps "
                f"(got {self.decay_steps} and {self.warmup_steps}); "
                "set the step at which lambda reaches crepa_lambda_end"
            )
        if not 0.0 <= self.similarity_ema_decay < 1.0:
            raise UserError(f"crepa_similarity_ema_decay must be in [0, 1), got {self.similarity_ema_decay}")
        for name in ("warmup_steps", "decay_steps", "cutoff_step"):
            if getattr(self, name) < 0:
                raise UserError(f"crepa_{name} must be >= 0, got {getattr(self, name)}")


class CrepaWeightSchedule:
    """lambda(step), plus the EMA state behind the similarity cutoff (saved with checkpoints)."""

    def __init__(self, config: CrepaScheduleConfig):
        self.config = config
        self.similarity_ema: float | None = None
        self.threshold_reached = False

    def scheduled_weight(self, step: int) -> float:
        """lambda from warmup, decay and the hard cutoff alone."""
        cfg = self.config
        if cfg.cutoff_step and step >= cfg.cutoff_step:
            return 0.0
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.weight * step / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return cfg.weight
        progress = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps))
        if cfg.scheduler == "linear":
            factor = 1.0 - progress
        elif cfg.scheduler == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = (1.0 - progress) ** cfg.power
        return cfg.weight_end + (cfg.weight - cfg.weight_end) * factor

    def weight(self, step: int) -> float:
        """lambda(step) including the similarity-threshold cutoff."""
        if self.threshold_reached:
            return 0.0
        return self.scheduled_weight(step)

    def needs_scores(self, step: int) -> bool:
        """Whether this step must compute CREPA scores at all.

        A recoverable threshold keeps measuring (without gradients) while it holds CREPA off,
        otherwise it could never switch back on; every other zero weight skips the work.
        """
        if self.weight(step) > 0.0:
            return True
        recovering = self.threshold_reached and self.config.threshold_mode == "recoverable"
        return recovering and self.scheduled_weight(step) > 0.0

    def observe(self, alignment_score: float) -> None:
        """Feed the step's alignment score into the EMA and update the threshold state."""
        cfg = self.config
        if cfg.similarity_threshold is None:
            return
        if self.similarity_ema is None:
            self.similarity_ema = alignment_score
        else:
            decay = cfg.similarity_ema_decay
            self.similarity_ema = decay * self.similarity_ema + (1.0 - decay) * alignment_score
        above = self.similarity_ema > cfg.similarity_threshold
        if cfg.threshold_mode == "permanent":
            self.threshold_reached = self.threshold_reached or above
        else:
            self.threshold_reached = above

    def state_dict(self) -> dict:
        return {"similarity_ema": self.similarity_ema, "threshold_reached": self.threshold_reached,
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.similarity_ema = state["similarity_ema"]
        self.threshold_reached = state["threshold_reached"]
