"""Options of `crepa train`, validated before any model loads, saved as JSON next to every checkpoint."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields

from crepa.errors import UserError
from crepa.fields import check_fields, flag_aliases, flag_name
from crepa.schedule import SCHEDULERS, THRESHOLD_MODES, CrepaScheduleConfig
from train.experts import EXPERTS

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "shift")
MIXED_PRECISION = ("no", "bf16", "fp16")
BASE_DTYPES = ("bf16", "fp16", "fp32", "fp8")
PROJECTORS = ("linear", "mlp")
REPORT_TO = ("tensorboard", "wandb", "none")


@dataclass
class TrainConfig:
    """One training run on a cache."""

    cache: str = ""
    """Cache directory/URL (Zarr) or a folder / brace pattern of webdataset shards."""
    family: str = ""
    """Model family: wan, ... (default: the family the cache was made for)."""
    model: str = ""
    """Diffusers pipeline folder or hub id; only its transformer/ is loaded."""
    transformer: str | None = None
    """Transformer folder or hub id, overriding <model>/transformer."""
    expert: str | None = field(default=None, metadata={"choices": EXPERTS})
    """Pipelines with two experts (Wan 2.2 A14B: transformer_2 and boundary_ratio in model_index.json): train the
    high-noise one (transformer), the low-noise one (transformer_2) or both, each on its own timesteps (default:
    both)."""
    output_dir: str = ""
    """Where checkpoints, the LoRA, logs and plots go."""

    # CREPA
    crepa_enabled: bool = True
    """Add the CREPA loss."""
    crepa_block_index: int | None = field(default=None, metadata={"min": 0})
    """0-based DiT block whose output is aligned (default: the family's, 8 for Wan and LTX-Video)."""
    crepa_lambda: float = field(default=0.5, metadata={"min": 0.0})
    """CREPA weight lambda."""
    crepa_adjacent_distance: int = field(default=1, metadata={"min": 0})
    """Neighbour distance d (0: frame-wise REPA)."""
    crepa_adjacent_tau: float = field(default=1.0, metadata={"min": 0.0, "exclusive": True})
    """Neighbour weight temperature: w = exp(-d / tau)."""
    crepa_cumulative_neighbors: bool = False
    """Align every distance 1..d instead of exactly d."""
    crepa_normalize_by_frames: bool = True
    """Divide each clip's score by its frame count."""
    crepa_normalize_neighbour_sum: bool = False
    """Divide each frame's score by 1 + the neighbour weights applied to it."""
    crepa_spatial_align: bool = True
    """Resample grids in 2-D to match (false: compare frame means)."""
    crepa_use_backbone_features: bool = False
    """Align to a deeper block of the same forward instead of cached encoder features."""
    crepa_teacher_block_index: int | None = field(default=None, metadata={"min": 0})
    """That deeper block (backbone mode)."""
    crepa_encoder: str | None = None
    """Teacher set to use when the cache holds several (encoder name or set fingerprint)."""
    crepa_projector: str = field(default="linear", metadata={"choices": PROJECTORS})
    """linear (LayerNorm + Linear) or mlp (REPA-style)."""
    crepa_projector_lr: float | None = field(default=None, metadata={"min": 0.0, "exclusive": True})
    """Projector learning rate (default: learning_rate)."""
    crepa_scheduler: str = field(default="constant", metadata={"choices": SCHEDULERS})
    """Lambda schedule: constant, linear, cosine, polynomial."""
    crepa_lambda_end: float = field(default=0.0, metadata={"min": 0.0})
    """Lambda reached at crepa_decay_steps."""
    crepa_decay_steps: int = field(default=0, metadata={"min": 0})
    """Absolute step where the decay ends."""
    crepa_power: float = field(default=1.0, metadata={"min": 0.0, "exclusive": True})
    """Polynomial decay power."""
    crepa_warmup_steps: int = field(default=0, metadata={"min": 0})
    """Linear lambda warmup steps."""
    crepa_cutoff_step: int = field(default=0, metadata={"min": 0})
    """Lambda is 0 from this step on (0: never)."""
    crepa_similarity_threshold: float | None = None
    """Switch CREPA off when the EMA of the alignment score passes this."""
    crepa_similarity_ema_decay: float = 0.99
    """EMA decay for that threshold."""
    crepa_threshold_mode: str = field(default="permanent", metadata={"choices": THRESHOLD_MODES})
    """permanent or recoverable."""

    # LoRA / full
    full: bool = False
    """Full fine-tune instead of LoRA."""
    base_dtype: str | None = field(default=None, metadata={"choices": BASE_DTYPES})
    """Storage of the frozen base weights: bf16, fp16, fp32 or fp8 (scaled, upcast to bf16 per layer).
    Default bf16 for LoRA, fp32 with --full (trained weights keep fp32 masters)."""
    lora_rank: int = field(default=16, metadata={"min": 1})
    """LoRA rank."""
    lora_alpha: float | None = field(default=None, metadata={"min": 0.0, "exclusive": True})
    """LoRA alpha (default: the rank)."""
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """LoRA dropout."""
    lora_target_modules: list[str] | None = None
    """Module-name suffixes to wrap (default: the family's attention projections)."""
    comfyui_export: bool = False
    """Also write the LoRA in ComfyUI's key format."""
    fsdp: bool = True
    """Shard a --full fine-tune on several processes with FSDP2 (weights, gradients, optimizer state; each
    transformer block its own unit); --no-fsdp keeps a whole copy per process (DDP). LoRA runs always use DDP."""

    # optimisation
    learning_rate: float = field(default=1e-4, metadata={"min": 0.0, "exclusive": True})
    """Peak learning rate."""
    lr_scheduler: str = field(default="constant", metadata={"choices": LR_SCHEDULERS})
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    lr_warmup_steps: int = field(default=0, metadata={"min": 0})
    """Learning-rate warmup steps."""
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS})
    """adamw, adam or sgd."""
    weight_decay: float = field(default=1e-2, metadata={"min": 0.0})
    """Decoupled weight decay (AdamW)."""
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})
    """Gradient clipping norm (0: off)."""
    batch_size: int = field(default=1, metadata={"min": 1})
    """Clips per process per micro-step (clips of one bucket)."""
    gradient_accumulation_steps: int = field(default=1, metadata={"min": 1})
    """Micro-steps per optimizer step."""
    max_train_steps: int | None = field(default=None, metadata={"min": 1})
    """Optimizer steps; overrides num_train_epochs."""
    num_train_epochs: int = field(default=1, metadata={"min": 1})
    """Epochs when max_train_steps is unset."""
    num_repeats: int = field(default=1, metadata={"min": 1})
    """Times each clip appears per epoch (multiplies the dataset's own num_repeats)."""
    mixed_precision: str = field(default="no", metadata={"choices": MIXED_PRECISION})
    """no, bf16, fp16."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    blocks_to_swap: int = field(default=0, metadata={"min": 0})
    """Keep the frozen weights of the last N transformer blocks in host memory and stream each to the GPU ahead of
    use (turns gradient checkpointing on; 0: none)."""
    seed: int = field(default=0, metadata={"min": 0})
    """Seed of data order, noise and timesteps."""
    timestep_sampling: str = field(default="logit_normal", metadata={"choices": TIMESTEP_SAMPLING})
    """Density of the noise level sigma = timestep/1000, with shift(s) = k*s/(1+(k-1)*s), k the flow shift:
    uniform: shift(U(0,1)); logit_normal: shift(sigmoid(logit_mean + logit_std*N(0,1)));
    sigmoid: sigmoid(sigmoid_scale*N(0,1)), not shifted; shift: shift(sigmoid(sigmoid_scale*N(0,1)))
    (sigmoid and shift as musubi-tuner defines them). uniform, logit_normal and shift apply the flow shift."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = field(default=1.0, metadata={"min": 0.0, "exclusive": True})
    """Std of the logit-normal density."""
    sigmoid_scale: float = field(default=1.0, metadata={"min": 0.0, "exclusive": True})
    """Scale of the normal draw in the sigmoid and shift densities (larger: more weight at both ends)."""
    min_timestep: float = field(default=0.0, metadata={"min": 0.0, "max": 1000.0})
    """Lowest timestep trained (0..1000, after the shift): the density is cut to [min, max], not squeezed into it."""
    max_timestep: float = field(default=1000.0, metadata={"min": 0.0, "max": 1000.0})
    """Highest timestep trained (0..1000, after the shift)."""
    flow_shift: float | None = field(default=None, metadata={"min": 0.0, "exclusive": True})
    """Static sigma shift (default: the pipeline's scheduler/scheduler_config.json, static or from the token count,
    else the family's default); the scheduler's shift_terminal stretch still applies."""
    dataloader_num_workers: int = field(default=2, metadata={"min": 0})
    """DataLoader worker processes."""
    caption_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Share of clips trained on the empty prompt instead of their caption (for classifier-free guidance), drawn
    per (seed, step, clip)."""

    # validation samples
    validation_prompts: str | None = None
    """Text file of prompts, one a line, sampled during training into validation/step-N/ (precompute their text
    with `crepa precompute --validation-prompts` first)."""
    validation_every: int = field(default=500, metadata={"min": 1})
    """Sample the validation prompts every N steps and after the last."""
    validation_steps: int = field(default=30, metadata={"min": 1})
    """Denoising (Euler) steps of a validation sample."""
    validation_guidance: float = field(default=5.0, metadata={"min": 1.0})
    """Classifier-free guidance scale against the empty prompt (1: no guidance, one forward a step)."""
    validation_size: list[int] | None = field(default=None, metadata={"nargs": 3, "min": 1,
                                                                      "metavar": "FRAMES HEIGHT WIDTH"})
    """Pixel frames, height and width of the validation samples (default: the cache's first bucket)."""
    decode_validation: bool = False
    """After training, decode the validation latents with the VAE into mp4s and contact sheets (`crepa decode`)."""

    # checkpoints and logging
    save_every: int = field(default=500, metadata={"min": 1, "aliases": ("checkpointing-steps",)})
    """Save checkpoint-N every N steps: resumable, with the LoRA as the final one is written."""
    keep_last: int | None = field(default=None, metadata={"min": 1, "aliases": ("checkpoints-total-limit",)})
    """Keep only the newest K checkpoints (default: all)."""
    resume: str | None = None
    """'latest' or a checkpoint folder to continue from."""
    report_to: str = field(default="tensorboard", metadata={"choices": REPORT_TO})
    """Tracker for the metrics, through accelerate: tensorboard (under logs/), wandb (pip install wandb) or none;
    metrics.jsonl is written either way."""
    tracker_project: str = "crepa"
    """Tracker project: the wandb project, the tensorboard folder under logs/."""
    log_every: int = field(default=1, metadata={"min": 1})
    """Steps between logged points."""

    def __post_init__(self) -> None:
        if self.base_dtype is None:
            self.base_dtype = "fp32" if self.full else "bf16"
        check_fields(self)
        if self.crepa_use_backbone_features and self.crepa_teacher_block_index is None:
            raise UserError("--crepa-use-backbone-features needs --crepa-teacher-block-index (a deeper block)")
        if self.full and self.base_dtype != "fp32":
            raise UserError(f"--full trains the base weights, which need fp32 master copies: use --base-dtype fp32 "
                             f"(with --mixed-precision bf16 for bf16 compute), not {self.base_dtype}")
        if self.full and self.blocks_to_swap:
            raise UserError("--blocks-to-swap streams the frozen base weights, and a --full run trains them",
                            fix="drop --blocks-to-swap or --full")
        if self.full and self.comfyui_export:
            raise UserError("--comfyui-export writes a LoRA, and a --full run trains the whole transformer (saved "
                             "under transformer/); drop --comfyui-export or --full")
        if self.min_timestep >= self.max_timestep:
            raise UserError(f"--min-timestep {self.min_timestep:g} must be below --max-timestep {self.max_timestep:g}",
                            fix="both are on the 0..1000 timestep scale; lower --min-timestep or raise --max-timestep")
        self.schedule_config()  # validates the lambda schedule options

    def require_paths(self) -> None:
        """The three locations every run needs, checked once options from all sources are merged."""
        for option in fields(self):
            if option.name in ("cache", "model", "output_dir") and not getattr(self, option.name):
                raise UserError(f"--{flag_name(option)} is required (on the command line or in --config)")

    def schedule_config(self) -> CrepaScheduleConfig:
        return CrepaScheduleConfig(
            weight=self.crepa_lambda, scheduler=self.crepa_scheduler, weight_end=self.crepa_lambda_end,
            decay_steps=self.crepa_decay_steps, power=self.crepa_power, warmup_steps=self.crepa_warmup_steps,
            cutoff_step=self.crepa_cutoff_step, similarity_threshold=self.crepa_similarity_threshold,
            similarity_ema_decay=self.crepa_similarity_ema_decay, threshold_mode=self.crepa_threshold_mode,
        )

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)


def read_config_file(path: str) -> dict:
    """Options from a TOML or JSON file, checked against the known option names; aliases become the names."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path} does not exist", fix="check the path")
    with open(path, "rb") as f:
        try:
            data = json.load(f) if path.endswith(".json") else tomllib.load(f)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(str(error), where=path, fix="fix the syntax there") from None
    data = data.get("train", data)  # a TOML may keep options under [train]
    aliases = {alias.replace("-", "_"): f.name for f in fields(TrainConfig) for alias in flag_aliases(f)}
    data = {aliases.get(name, name): value for name, value in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        raise UserError(f"{path}: unknown option(s) {', '.join(hints)}")
    return data
