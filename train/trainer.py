"""`run_train`: the transformer alone, trained from cached latents, text and teacher features."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from crepa.capture import BlockCapture
from crepa.errors import UserError
from crepa.families import Conditioning, FamilyAdapter, get_family
from crepa.families.loading import config_file, load_config
from crepa.loss import crepa_loss, crepa_scores
from crepa.projector import CrepaProjector
from crepa.prompts import EMPTY_PROMPT
from crepa.schedule import CrepaWeightSchedule
from train.base_loading import load_base
from train.block_swap import swap_blocks
from train.caption_dropout import drop_captions, dropped_captions
from train.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, save_projector
from train.config import TrainConfig
from train.data import prompt_conditioning, split_by_text_length
from train.experts import PRIMARY, Denoiser, DenoiserSet, Stage, training_stages
from train.flow_matching import TimestepSampling, describe_timesteps, noisy_input, sample_noise, timesteps_from_sigmas
from train.loader import TrainData, build_data, default_family
from train.lora import add_lora, check_comfyui_export, check_comfyui_family, save_lora
from train.metrics import MetricsLog, plot_curves, tracker_options
from train.precision import enable_tf32, prepare_base
from train.sharding import full_tensor, prepare_models, save_full_model, use_fsdp
from train.validation import Validation


@dataclass
class TrainResult:
    steps: int
    lora_path: str | None
    projector_path: str | None
    plot_path: str | None
    data_wait_fraction: float
    """Share of the steady-state wall time spent waiting for batches (after the first, which starts workers)."""
    validation_dir: str | None = None
    """Where this (main) process wrote validation samples, if it did."""


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
    sigma_range: tuple[float, float] | None = field(default=None, kw_only=True)
    """Noise levels the transformer denoises in its pipeline (one expert of several); None: all of them."""
    empty_text: Conditioning | None = field(default=None, kw_only=True)
    """The cached empty prompt (one prompt) that replaces dropped captions; None without caption dropout."""
    vae_compression: tuple[int, int] | None = field(default=None, kw_only=True)
    """(temporal, spatial) compression of the pipeline's VAE (from its config), None when the folder has no VAE."""

    @property
    def empty_text_length(self) -> int:
        """Tokens of the cached empty prompt (which replaces dropped captions)."""
        return int(self.empty_text.text_mask.sum())

    def shift(self, latent_shape: torch.Size) -> float:
        """Sigma shift for latents of `latent_shape` (B, C, F, H, W)."""
        return self.config.flow_shift or self.adapter.flow_shift(self.scheduler_config, latent_shape)

    def sampling(self, latent_shape: torch.Size) -> TimestepSampling:
        """The density of the noise levels this transformer trains on, for latents of `latent_shape`."""
        sampling = TimestepSampling.from_config(self.config, self.shift(latent_shape),
                                                self.adapter.flow_terminal(self.scheduler_config))
        return sampling if self.sigma_range is None else sampling.within(self.sigma_range)

    def at_step(self, denoisers: DenoiserSet, step: int, latent_shape: torch.Size) -> tuple[StepParts, dict]:
        """These parts with the denoiser that trains at `step` (see train.experts), and the metric naming it."""
        index = denoisers.index_at(self.config.seed, step, self.sampling(latent_shape))
        chosen = denoisers.denoisers[index]
        parts = replace(self, transformer=chosen.transformer, projector=chosen.projector,
                        sigma_range=chosen.sigma_range)
        return parts, ({"denoiser": index} if len(denoisers) > 1 else {})


@dataclass
class TrainState:
    """What a checkpoint saves: the trainable modules, optimizer, schedules, and the position in the data."""

    denoisers: DenoiserSet
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


def forward_runs(adapter: FamilyAdapter, batch: dict,
                 dropped: tuple[list[bool], int] | None = None) -> tuple[dict, list[tuple[slice, int | None]]]:
    """(the batch, its forwards as (rows, text tokens)): one forward of all rows with the padded text, or for a family
    whose text cannot be padded one per caption length, the batch sorted by it (`split_by_text_length`).

    `dropped` is (whether each clip's caption is dropped, the empty prompt's token count): a dropped clip runs with
    the empty prompt's length.
    """
    if adapter.text_padding:
        return batch, [(slice(None), None)]
    lengths = batch["text_mask"].sum(dim=1)
    if dropped is not None:
        lengths = torch.where(torch.tensor(dropped[0]), dropped[1], lengths)
    return split_by_text_length(batch, lengths)


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

    Only the transformer's forward runs under mixed-precision autocast (`accelerator.prepare` or FSDP sharding
    wraps it); the losses, the projector and the CREPA scores run in fp32 with autocast off, whoever calls this.
    """
    cfg = parts.config
    dropped = None
    if parts.empty_text is not None:
        dropped = (dropped_captions(batch["keys"], cfg.seed, step, cfg.caption_dropout), parts.empty_text_length)
    batch, runs = forward_runs(parts.adapter, batch, dropped)  # both losses are means over clips: order is free
    latents = batch["latents"].to(device)  # (B, C, F, H, W)
    sampling = parts.sampling(latents.shape)
    # each clip's noise and sigma follow from (seed, step, clip key), drawn on the device: no host copies, and
    # the same however the global batch is split over ranks and micro-steps
    noise, sigmas = sample_noise(batch["keys"], latents.shape[1:], cfg.seed, step, sampling, device)
    noisy, target = noisy_input(latents, noise, sigmas)
    timesteps = timesteps_from_sigmas(sigmas)
    conditioning = Conditioning.from_batch(batch, device, parts.vae_compression)
    if parts.empty_text is not None:
        conditioning = drop_captions(conditioning, parts.empty_text,
                                     dropped_captions(batch["keys"], cfg.seed, step, cfg.caption_dropout))
    weight = parts.schedule.weight(step) if cfg.crepa_enabled else 0.0
    measure = cfg.crepa_enabled and parts.schedule.needs_scores(step)
    metrics = {"crepa_weight": weight, "flow_shift": sampling.shift}
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
    if data.latent_channels + data.condition_channels != channels:
        condition = f" plus {data.condition_channels} of first-frame condition" if data.condition_channels else ""
        raise UserError(f"cache latents have {data.latent_channels} channels{condition} but the {adapter.name} "
                         f"transformer takes {channels}: the cache was made with another VAE or for another kind of "
                         "model (text- or image-to-video); precompute it with this model")
    image_dim = adapter.image_embedding_dim(model)
    if data.image_embeds_dim != image_dim:
        cached = f"{data.image_embeds_dim}-wide" if data.image_embeds_dim else "no"
        taken = f"{image_dim}-wide" if image_dim else "none"
        raise UserError(f"the cache holds {cached} image embeddings of the first frame but the transformer takes "
                         f"{taken}: precompute the cache with this model's pipeline")
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
    account of where the flow shift (and the terminal stretch, where there is one) comes from."""
    path = config_file(cfg.model, "scheduler", "scheduler_config.json")
    if path is None:
        config = {}
        source = (f"flow shift from the {adapter.name} default scheduler config {adapter.default_scheduler_config()} "
                  "(the pipeline has none; pass --flow-shift to set the shift)")
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # any scheduler class's load_config returns scheduler_config.json as saved, whichever scheduler wrote it
        config = load_config(FlowMatchEulerDiscreteScheduler, cfg.model, "scheduler")
        source = f"flow shift from {path}"
    if cfg.flow_shift:
        source = f"flow shift {cfg.flow_shift} (--flow-shift)"
    terminal = adapter.flow_terminal(config)
    if terminal:
        source += f", sigmas stretched to end at {terminal} (shift_terminal)"
    return config, source


def pipeline_vae_compression(cfg: TrainConfig, adapter: FamilyAdapter) -> tuple[int, int] | None:
    """(temporal, spatial) compression from the pipeline's vae/config.json (no weights); None when it has none."""
    if config_file(cfg.model, "vae", "config.json") is None:
        return None
    return adapter.vae_compression(load_config(adapter.vae_class(), cfg.model, "vae"))


def build_optimizer(cfg: TrainConfig, transformer: nn.Module, projector: nn.Module | None,
                    *more: tuple[nn.Module, nn.Module | None]) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable transformer weights and the projector (and those of `more`
    denoisers: one param group each, in order).

    Adam(W) runs fused: one kernel per step, and none of the foreach path's parameter-sized temporaries.
    """
    groups = []
    for model, crepa_projector in ((transformer, projector), *more):
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.learning_rate})
        if crepa_projector is not None:
            groups.append({"params": list(crepa_projector.parameters()),
                           "lr": cfg.crepa_projector_lr or cfg.learning_rate})
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
    grad_norm = full_tensor(accelerator.clip_grad_norm_(params, max_norm))  # FSDP: the norm over all shards
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
    if cfg.crepa_block_index is None:
        cfg.crepa_block_index = adapter.default_crepa_block
    if cfg.comfyui_export:
        check_comfyui_family(adapter)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps, **tracker_options(cfg))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    fsdp = use_fsdp(cfg, accelerator)
    set_seed(cfg.seed)  # LoRA and projector initialisation
    with_teacher = cfg.crepa_enabled and not cfg.crepa_use_backbone_features
    data = build_data(cfg, with_teacher, rank, world)
    scheduler_config, shift_source = scheduler_settings(cfg, adapter)
    stages = training_stages(cfg.model, cfg.expert)
    empty_text = None
    if cfg.caption_dropout > 0:
        empty_text = prompt_conditioning(data.prompt_texts([EMPTY_PROMPT], "--caption-dropout"), data.text_length)
    validation = Validation.build(cfg, adapter, data, stages) if cfg.validation_prompts else None

    enable_tf32()
    built = [_trainable_denoiser(cfg, adapter, data, stage, device) for stage in stages]

    steps_per_epoch = max(1, data.batches_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or steps_per_epoch * cfg.num_train_epochs
    optimizer = build_optimizer(cfg, *built[0], *built[1:])
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)
    prepared, optimizer = prepare_models(accelerator, adapter, built, optimizer, fsdp)
    trainables = [model for pair in prepared for model in pair if model is not None]
    denoisers = DenoiserSet([Denoiser(stage, transformer, projector)
                             for stage, (transformer, projector) in zip(stages, prepared, strict=True)])
    schedule = CrepaWeightSchedule(cfg.schedule_config())
    first = denoisers.denoisers[0]
    parts = StepParts(adapter, first.transformer, first.projector, schedule, cfg, scheduler_config,
                      empty_text=empty_text, vae_compression=pipeline_vae_compression(cfg, adapter))
    state = TrainState(denoisers, optimizer, lr_scheduler, schedule)

    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.resume:
        _resume(cfg, accelerator, state)
    if main:
        cfg.save(os.path.join(cfg.output_dir, "train_config.json"))
        print(f"{data.describe()}, {world} process(es) x batch "
              f"{cfg.batch_size} x accumulation {cfg.gradient_accumulation_steps} = "
              f"{world * cfg.batch_size * cfg.gradient_accumulation_steps} clips/step; {steps_per_epoch} steps/epoch, "
              f"{max_steps} steps; {denoisers.describe()}: trainable {_count(d.transformer for d in denoisers):,} "
              f"transformer + {_count(d.projector for d in denoisers):,} projector params; {shift_source}; "
              f"{describe_timesteps(cfg)}")
    log = MetricsLog(cfg, accelerator, start_step=state.step)
    batches = data.iterate(state.epoch, state.consumed)
    bar = tqdm(total=max_steps, initial=state.step, desc="train", unit="step", disable=not main)
    wait_total, wall_start, validation_dir = 0.0, None, None
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
            step_parts, chosen = parts.at_step(denoisers, state.step, batch["latents"].shape)
            # one gradient all-reduce per optimizer step, for the transformer and the projector alike;
            # backward divides the loss by the accumulation steps
            with accelerator.accumulate(*trainables):
                loss, metrics = train_step(step_parts, batch, state.step, device)
                accelerator.backward(loss)
            for name, value in {"loss": loss.detach(), **metrics, **chosen}.items():  # on the device: no sync here
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
        if state.step % cfg.save_every == 0 and state.step < max_steps:
            _checkpoint(cfg, accelerator, state, adapter)
        if validation is not None and main and validation.due(state.step, max_steps):
            unwrapped = [replace(d, transformer=accelerator.unwrap_model(d.transformer)) for d in denoisers]
            validation_dir = validation.run(DenoiserSet(unwrapped), state.step, parts)
    bar.close()
    _checkpoint(cfg, accelerator, state, adapter)
    steady = time.perf_counter() - wall_start if wall_start is not None else 0.0
    result = TrainResult(state.step, None, None, None, wait_total / steady if steady > 0 else 0.0,
                         os.path.dirname(validation_dir) if validation_dir else None)
    if cfg.full:  # on every rank: FSDP shards are gathered first
        for denoiser in denoisers:
            save_full_model(adapter, denoiser.transformer, os.path.join(cfg.output_dir, denoiser.stage.component),
                            main)
    if main:
        saved = [_save_trained(cfg, adapter, component, model, projector)
                 for component, (model, projector) in _unwrapped(accelerator, denoisers).items()]
        result.lora_path, result.projector_path = saved[0]
        if os.path.exists(log.path):
            result.plot_path = plot_curves(log.path, os.path.join(cfg.output_dir, "training_curves.png"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _trainable_denoiser(cfg: TrainConfig, adapter: FamilyAdapter, data: TrainData, stage: Stage,
                        device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """The pipeline's transformer of `stage`, checked against the cache, made trainable; and its CREPA projector."""
    override = cfg.transformer if stage.component == PRIMARY else None
    transformer = load_base(adapter.transformer_class(), cfg.model, stage.component, override, cfg.base_dtype)
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
    if cfg.blocks_to_swap:  # before `prepare` moves the model: the swapped weights never reach the device whole
        swap_blocks(adapter, transformer, cfg.blocks_to_swap, device)
    transformer.train()
    projector = None
    if cfg.crepa_enabled:
        hidden_dim = adapter.hidden_dim(transformer)
        teacher_dim = hidden_dim if cfg.crepa_use_backbone_features else data.teacher_dim
        projector = CrepaProjector(hidden_dim, teacher_dim, kind=cfg.crepa_projector)
    return transformer, projector


def _save_trained(cfg: TrainConfig, adapter: FamilyAdapter, component: str, model: nn.Module,
                  projector: nn.Module | None) -> tuple[str | None, str | None]:
    """One pipeline component's LoRA (full weights are saved on every rank before) and projector; their paths."""
    lora_path = None if cfg.full else _save_lora(cfg, adapter, component, model, cfg.output_dir)
    return lora_path, save_projector(projector, cfg.output_dir, component) if projector is not None else None


def _save_lora(cfg: TrainConfig, adapter: FamilyAdapter, component: str, model: nn.Module, folder: str) -> str:
    return save_lora(adapter, model, folder, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.comfyui_export,
                     component)


def _count(modules: Iterable[nn.Module | None]) -> int:
    """Trainable parameters of the modules (None counts 0)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters() if p.requires_grad)


def _unwrapped(accelerator, denoisers: DenoiserSet) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """Pipeline component -> its model and projector without the DDP / compile wrappers."""
    return {d.stage.component: (accelerator.unwrap_model(d.transformer),
                                accelerator.unwrap_model(d.projector) if d.projector is not None else None)
            for d in denoisers}


def _checkpoint(cfg: TrainConfig, accelerator, state: TrainState, adapter: FamilyAdapter) -> None:
    """checkpoint-<step> in the output folder, with the LoRA files of that step, keeping the newest `keep_last`."""
    denoisers = _unwrapped(accelerator, state.denoisers)

    def export(folder: str) -> None:
        for component, (model, _) in denoisers.items():
            _save_lora(cfg, adapter, component, model, folder)

    save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{state.step}"), denoisers=denoisers,
                    optimizer=state.optimizer, lr_scheduler=state.lr_scheduler, rank=accelerator.process_index,
                    trainer_state=state.position(), export=None if cfg.full else export)
    if accelerator.is_main_process:
        prune_checkpoints(cfg.output_dir, cfg.keep_last)


def _resume(cfg: TrainConfig, accelerator, state: TrainState) -> None:
    """Restore `state` from the checkpoint `--resume` names."""
    saved = load_checkpoint(find_checkpoint(cfg.output_dir, cfg.resume),
                            denoisers=_unwrapped(accelerator, state.denoisers), optimizer=state.optimizer,
                            lr_scheduler=state.lr_scheduler, rank=accelerator.process_index)
    state.step, state.epoch, state.consumed = saved["step"], saved["epoch"], saved["consumed"]
    state.schedule.load_state_dict(saved["crepa_schedule"])
