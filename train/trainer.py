"""`run_train`: the transformer alone, trained from cached latents, text and teacher features."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from crepa.capture import BlockCapture
from crepa.errors import UserError
from crepa.families import Conditioning, FamilyAdapter, get_family
from crepa.families.loading import config_file, load_config, load_pretrained
from crepa.loss import crepa_loss, crepa_scores
from crepa.projector import CrepaProjector
from crepa.schedule import CrepaWeightSchedule
from train.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, save_projector
from train.config import TrainConfig
from train.data import split_by_text_length
from train.flow_matching import noisy_input, sample_noise, timesteps_from_sigmas
from train.loader import TrainData, build_data, default_family
from train.lora import add_lora, check_comfyui_export, save_lora
from train.metrics import MetricsLog, plot_curves
from train.precision import LOAD_DTYPE, enable_tf32, prepare_base


@dataclass
class TrainResult:
    steps: int
    lora_path: str | None
    projector_path: str | None
    plot_path: str | None
    data_wait_fraction: float
    """Share of the steady-state wall time spent waiting for batches (after the first, which starts workers)."""


@dataclass
class StepParts:
    """The models and settings one step needs."""

    adapter: FamilyAdapter
    transformer: nn.Module
    projector: nn.Module | None
    schedule: CrepaWeightSchedule
    config: TrainConfig
    scheduler_config: dict
    """The pipeline's scheduler config, {} when it has none: the flow shift's source unless --flow-shift is given."""

    def shift(self, latent_shape: torch.Size) -> float:
        """Sigma shift for latents of `latent_shape` (B, C, F, H, W)."""
        return self.config.flow_shift or self.adapter.flow_shift(self.scheduler_config, latent_shape)


@dataclass
class TrainState:
    """What a checkpoint saves: the trainable modules, optimizer, schedules, and the position in the data."""

    transformer: nn.Module
    projector: nn.Module | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    schedule: CrepaWeightSchedule
    step: int = 0
    epoch: int = 0
    consumed: int = 0
    """Micro-batches taken from `epoch` so far."""

    def position(self) -> dict:
        """trainer_state.json: where the run stands."""
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed,
                "crepa_schedule": self.schedule.state_dict()}


def forward_runs(adapter: FamilyAdapter, batch: dict) -> tuple[dict, list[tuple[slice, int | None]]]:
    """(the batch, its forwards as (rows, text tokens)): one forward of all rows with the padded text, or for a family
    whose text cannot be padded one per caption length, the batch sorted by it (`split_by_text_length`)."""
    if adapter.text_padding:
        return batch, [(slice(None), None)]
    return split_by_text_length(batch)


def denoise(parts: StepParts, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
            runs: list[tuple[slice, int | None]]) -> torch.Tensor:
    """The transformer's (B, C, F, H, W) prediction for a batch: one forward per (rows, text tokens) in `runs`.

    A family whose text cannot be padded runs each caption length apart (`forward_runs`), its text cut to that
    length: every clip is denoised seeing its own caption's tokens only, as its pipeline denoises it.
    """
    predictions = []
    for rows, tokens in runs:
        kwargs = parts.adapter.transformer_kwargs(parts.transformer, noisy[rows], timesteps[rows],
                                                  conditioning.select(rows, tokens))
        predictions.append(parts.adapter.prediction(parts.transformer(**kwargs), noisy[rows].shape))
    return predictions[0] if len(predictions) == 1 else torch.cat(predictions)


def train_step(parts: StepParts, batch: dict, step: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Flow-matching loss plus the CREPA term for one micro-batch; returns (loss, metrics).

    Only the transformer's forward runs under mixed-precision autocast (`accelerator.prepare` wraps it);
    the losses, the projector and the CREPA scores run in fp32 with autocast off, whoever calls this.
    """
    cfg = parts.config
    batch, runs = forward_runs(parts.adapter, batch)  # both losses are means over clips: their order does not matter
    latents = batch["latents"].to(device)  # (B, C, F, H, W)
    shift = parts.shift(latents.shape)
    # each clip's noise and sigma follow from (seed, step, clip key), drawn on the device: no host copies, and
    # the same however the global batch is split over ranks and micro-steps
    noise, sigmas = sample_noise(batch["keys"], latents.shape[1:], cfg.seed, step, cfg.timestep_sampling,
                                 shift, cfg.logit_mean, cfg.logit_std, device)
    noisy, target = noisy_input(latents, noise, sigmas)
    timesteps, conditioning = timesteps_from_sigmas(sigmas), Conditioning.from_batch(batch, device)
    weight = parts.schedule.weight(step) if cfg.crepa_enabled else 0.0
    measure = cfg.crepa_enabled and parts.schedule.needs_scores(step)
    metrics = {"crepa_weight": weight, "flow_shift": shift}
    if not measure:  # no hook, no projector, no scores: a zero weight costs nothing
        prediction = denoise(parts, noisy, timesteps, conditioning, runs)
        loss = flow = F.mse_loss(prediction.float(), target.float())
        return loss, {**metrics, "loss_flow": flow.detach()}

    teacher_block = cfg.crepa_teacher_block_index if cfg.crepa_use_backbone_features else None
    with BlockCapture(parts.adapter, parts.transformer, cfg.crepa_block_index, teacher_block) as capture:
        prediction = denoise(parts, noisy, timesteps, conditioning, runs)
        student = capture.student(latents.shape)  # (B, F, hs, ws, D_dit)
        teacher = capture.teacher(latents.shape) if teacher_block is not None else batch["teacher"].to(device)
    flow = F.mse_loss(prediction.float(), target.float())
    with torch.set_grad_enabled(weight > 0.0), torch.autocast(device.type, enabled=False):
        scores = crepa_scores(
            parts.projector(student), teacher.float(), distance=cfg.crepa_adjacent_distance,
            tau=cfg.crepa_adjacent_tau, cumulative=cfg.crepa_cumulative_neighbors,
            normalize_by_frames=cfg.crepa_normalize_by_frames,
            normalize_neighbour_sum=cfg.crepa_normalize_neighbour_sum, spatial_align=cfg.crepa_spatial_align,
        )
    alignment = crepa_loss(scores, weight) if weight > 0.0 else torch.zeros((), device=device)
    return flow + alignment, {**metrics, "loss_flow": flow.detach(), "crepa_loss": alignment.detach(),
                              "crepa_alignment_score": scores.alignment_score.detach(),
                              "crepa_similarity_self": scores.similarity_self.detach()}


def check_compatibility(adapter: FamilyAdapter, transformer: nn.Module, data: TrainData, cfg: TrainConfig) -> None:
    """Everything about the cache that could fail mid-run is checked before step 0."""
    model = adapter.unwrap(transformer)
    channels = adapter.latent_channels(model)
    if data.latent_channels != channels:
        raise UserError(f"cache latents have {data.latent_channels} channels but the {adapter.name} transformer "
                         f"takes {channels}: the cache was made with another VAE; precompute it with this model")
    text_dim = adapter.text_embedding_dim(model)
    if data.text_dim != text_dim:
        raise UserError(f"cache text embeddings are {data.text_dim}-wide but the transformer takes {text_dim}: "
                         "the cache was made with another text encoder; precompute it with this model's")
    if cfg.crepa_enabled:
        adapter.check_block_index(model, cfg.crepa_block_index, "crepa_block_index")
        if cfg.crepa_use_backbone_features:
            adapter.check_block_index(model, cfg.crepa_teacher_block_index, "crepa_teacher_block_index")
        elif data.teacher_frames is not None and data.teacher_frames != data.latent_frames:
            raise UserError(f"cache teacher has {data.teacher_frames} frames per clip but the latents have "
                             f"{data.latent_frames}; it was made with another VAE's temporal compression")


def scheduler_settings(cfg: TrainConfig, adapter: FamilyAdapter) -> tuple[dict, str]:
    """The pipeline's scheduler config ({} when it has none), read without weights, and the start-up line's
    account of where the flow shift comes from."""
    if cfg.flow_shift:
        return {}, f"flow shift {cfg.flow_shift} (--flow-shift)"
    path = config_file(cfg.model, "scheduler", "scheduler_config.json")
    if path is None:
        return {}, (f"flow shift {adapter.default_flow_shift}: the {adapter.name} default, the pipeline has no "
                    "scheduler config (pass --flow-shift to set it)")
    from diffusers import FlowMatchEulerDiscreteScheduler

    # any scheduler class's load_config returns scheduler_config.json as saved, whichever scheduler wrote it
    return load_config(FlowMatchEulerDiscreteScheduler, cfg.model, "scheduler"), f"flow shift from {path}"


def build_optimizer(cfg: TrainConfig, transformer: nn.Module,
                    projector: nn.Module | None) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable transformer weights and the projector.

    Adam(W) runs fused: one kernel per step, and none of the foreach path's parameter-sized temporaries.
    """
    groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if projector is not None:
        groups.append({"params": list(projector.parameters()), "lr": cfg.crepa_projector_lr or cfg.learning_rate})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def optimizer_step(accelerator, optimizer, lr_scheduler, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the accumulated gradients and step; a non-finite gradient skips the update. Returns the grad norm.

    Under an fp16 grad scaler the optimizer steps every time: the scaler skips a non-finite update itself and
    lowers its scale, and it must see every step, or the next unscale finds it still holding this one.
    """
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    if accelerator.scaler is not None:
        optimizer.step()
        if not optimizer.step_was_skipped:
            lr_scheduler.step()
    elif torch.isfinite(grad_norm):  # the step's one host sync before stepping
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_train(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    cfg.require_paths()
    cfg.family = cfg.family or default_family(cfg.cache)
    adapter = get_family(cfg.family)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # LoRA and projector initialisation
    with_teacher = cfg.crepa_enabled and not cfg.crepa_use_backbone_features
    data = build_data(cfg, with_teacher, rank, world)
    scheduler_config, shift_source = scheduler_settings(cfg, adapter)

    enable_tf32()
    transformer = load_pretrained(adapter.transformer_class(), cfg.model, "transformer", cfg.transformer,
                                  torch_dtype=LOAD_DTYPE[cfg.base_dtype])
    adapter.set_attention_backend(transformer)
    check_compatibility(adapter, transformer, data, cfg)
    if cfg.full:
        transformer.requires_grad_(True)
    else:
        add_lora(transformer, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_dropout,
                 cfg.lora_target_modules or list(adapter.default_lora_targets))
        if cfg.comfyui_export:
            check_comfyui_export(adapter, transformer)
    prepare_base(transformer, cfg.base_dtype)  # after freezing: fp8 quantises only frozen layers
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    projector = None
    if cfg.crepa_enabled:
        hidden_dim = adapter.hidden_dim(transformer)
        teacher_dim = hidden_dim if cfg.crepa_use_backbone_features else data.teacher_dim
        projector = CrepaProjector(hidden_dim, teacher_dim, kind=cfg.crepa_projector)

    steps_per_epoch = max(1, data.batches_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or steps_per_epoch * cfg.num_train_epochs
    optimizer = build_optimizer(cfg, transformer, projector)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    if projector is not None:
        transformer, projector, optimizer = accelerator.prepare(transformer, projector, optimizer)
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
    trainables = [m for m in (transformer, projector) if m is not None]
    schedule = CrepaWeightSchedule(cfg.schedule_config())
    parts = StepParts(adapter, transformer, projector, schedule, cfg, scheduler_config)
    state = TrainState(transformer, projector, optimizer, lr_scheduler, schedule)

    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.resume:
        _resume(cfg, accelerator, state)
    if main:
        cfg.save(os.path.join(cfg.output_dir, "train_config.json"))
        print(f"{data.describe()}, {world} process(es) x batch "
              f"{cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} = "
              f"{world * cfg.batch_size * cfg.gradient_accumulation_steps} clips/step; {steps_per_epoch} steps/epoch, "
              f"{max_steps} steps; trainable {sum(p.numel() for p in optimizer.param_groups[0]['params']):,} "
              f"transformer + {sum(p.numel() for p in projector.parameters()) if projector else 0:,} projector params; "
              f"{shift_source}")
    log = MetricsLog(cfg.output_dir, cfg.report_to, main, start_step=state.step)
    batches = data.iterate(state.epoch, state.consumed)
    bar = tqdm(total=max_steps, initial=state.step, desc="train", unit="step", disable=not main)
    wait_total, wall_start = 0.0, None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    while state.step < max_steps:
        start = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        for _ in range(cfg.gradient_accumulation_steps):
            fetch = time.perf_counter()
            state.epoch, state.consumed, batch = next(batches)
            if wall_start is None:  # the first batch pays for worker start-up; measure from here on
                wall_start = time.perf_counter()
            else:
                wait_total += time.perf_counter() - fetch
            # one gradient all-reduce per optimizer step, for the transformer and the projector alike;
            # backward divides the loss by the accumulation steps
            with accelerator.accumulate(*trainables):
                loss, metrics = train_step(parts, batch, state.step, device)
                accelerator.backward(loss)
            for name, value in {"loss": loss.detach(), **metrics}.items():  # stays on the device: no sync here
                sums[name] = sums.get(name, 0.0) + torch.as_tensor(value, dtype=torch.float32, device=device) / \
                    cfg.gradient_accumulation_steps
        grad_norm = optimizer_step(accelerator, optimizer, lr_scheduler, params, cfg.max_grad_norm or math.inf)
        if "crepa_alignment_score" in sums and cfg.crepa_similarity_threshold is not None:
            schedule.observe(float(accelerator.reduce(sums["crepa_alignment_score"], "mean")))
        state.step += 1
        sums["grad_norm"] = grad_norm.float()
        values = dict(zip(sums, torch.stack(list(sums.values())).tolist(), strict=True))  # one copy to the host
        elapsed = time.perf_counter() - start
        values |= {"lr": lr_scheduler.get_last_lr()[0], "step_time": elapsed,
                   "samples_per_second": world * cfg.batch_size * cfg.gradient_accumulation_steps / elapsed}
        if state.step % cfg.log_every == 0 or state.step == max_steps:
            log.log(state.step, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", crepa=f"{values.get('crepa_alignment_score', 0):.3f}")
        bar.update(1)
        if state.step % cfg.checkpointing_steps == 0 and state.step < max_steps:
            _checkpoint(cfg, accelerator, state)
    bar.close()
    log.close()
    _checkpoint(cfg, accelerator, state)
    steady = time.perf_counter() - wall_start if wall_start is not None else 0.0
    result = TrainResult(state.step, None, None, None, wait_total / steady if steady > 0 else 0.0)
    if main:
        model = accelerator.unwrap_model(transformer)
        if cfg.full:
            model.save_pretrained(os.path.join(cfg.output_dir, "transformer"))
        else:
            result.lora_path = save_lora(adapter, model, cfg.output_dir, cfg.lora_rank,
                                         cfg.lora_alpha or cfg.lora_rank, cfg.comfyui_export)
        if projector is not None:
            result.projector_path = save_projector(accelerator.unwrap_model(projector), cfg.output_dir)
        if os.path.exists(log.path):
            result.plot_path = plot_curves(log.path, os.path.join(cfg.output_dir, "training_curves.png"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _checkpoint(cfg: TrainConfig, accelerator, state: TrainState) -> None:
    """checkpoint-<step> in the output folder, keeping the newest `checkpoints_total_limit`."""
    save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{state.step}"),
                    model=accelerator.unwrap_model(state.transformer),
                    projector=accelerator.unwrap_model(state.projector) if state.projector is not None else None,
                    optimizer=state.optimizer, lr_scheduler=state.lr_scheduler, rank=accelerator.process_index,
                    trainer_state=state.position())
    if accelerator.is_main_process:
        prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)


def _resume(cfg: TrainConfig, accelerator, state: TrainState) -> None:
    """Restore `state` from the checkpoint `--resume` names."""
    saved = load_checkpoint(find_checkpoint(cfg.output_dir, cfg.resume),
                            model=accelerator.unwrap_model(state.transformer),
                            projector=accelerator.unwrap_model(state.projector) if state.projector else None,
                            optimizer=state.optimizer, lr_scheduler=state.lr_scheduler, rank=accelerator.process_index)
    state.step, state.epoch, state.consumed = saved["step"], saved["epoch"], saved["consumed"]
    state.schedule.load_state_dict(saved["crepa_schedule"])
