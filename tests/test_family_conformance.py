"""Every registered family adapter against its own diffusers pipeline: the same checks for each family.

The reference is always what users run: the family's pipeline class loaded from a tiny pipeline folder, its
`encode_prompt`, the latent un-normalisation its `__call__` applies before `vae.decode`, and its
`load_lora_weights`.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.capture import BlockCapture
from crepa.errors import UserError
from crepa.families import SUPPORTED_FAMILIES, Conditioning, get_family
from crepa.families.base import spatial_patch
from crepa.families.loading import load_config
from crepa.tiny_models import tiny_clip_size
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.pipeline import run_precompute
from train.config import TrainConfig
from train.data import collate, to_tensors
from train.lora import COMFYUI_WEIGHTS, LORA_WEIGHTS, lora_layers
from train.trainer import forward_runs, run_train


@pytest.fixture(scope="session", params=SUPPORTED_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def pipeline_folder(family, tiny_pipelines) -> str:
    return tiny_pipelines(family)


CLIP_SIZE = (96, 64)
"""(width, height) of the cached clip: multiples of 32, which every family's pipeline generates at (the sides some
pipelines demand, e.g. SanaVideoPipeline.check_inputs), and not square, so a swapped height and width shows."""


@pytest.fixture(scope="session")
def one_clip_cache(family, pipeline_folder, tiny_models, tmp_path_factory) -> str:
    """A finished cache of one clip for `family`, text stored in float32 to compare with the pipeline's."""
    root = tmp_path_factory.mktemp(f"{family}_cache")
    out = str(root / "cache")
    dataset = write_dataset(root, clips=1, family=family, resolution=CLIP_SIZE)
    run_precompute(PrecomputeConfig(dataset_config=dataset, family=family, out=out,
                                    model=pipeline_folder, device="cpu", decode_workers=0, text_dtype="float32",
                                    teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)))
    return out


@pytest.fixture(scope="session")
def cached_sample(family, one_clip_cache) -> tuple[dict, str, int]:
    """(the view's sample of the cached clip, its caption, the cached text length)."""
    view = CacheView(CacheStore.open(one_clip_cache), family)
    (clip,) = view.clips
    return view.load(clip), clip.caption, view.text.attrs["max_length"]


def load_pipeline(family: str, folder: str):
    import diffusers

    return getattr(diffusers, get_family(family).pipeline_class_name).from_pretrained(folder)


def conditioning(family: str, folder: str, samples: list[dict], text_length: int) -> Conditioning:
    """The cached clips' conditioning as the trainer hands it to one forward, with the VAE compression of the
    pipeline's config."""
    adapter = get_family(family)
    compression = adapter.vae_compression(load_config(adapter.vae_class(), folder, "vae"))
    batch, ((rows, tokens),) = forward_runs(adapter, collate([to_tensors(s) for s in samples], text_length))
    return Conditioning.from_batch(batch, torch.device("cpu"), compression).select(rows, tokens)


def noise_like(sample: dict, seed: int = 3) -> torch.Tensor:
    """(1, C, F, H, W) noise shaped like the cached clip's latents."""
    return torch.randn((1, *sample["latents"].shape), generator=torch.Generator().manual_seed(seed))


def forward_inputs(family: str, folder: str, transformer: torch.nn.Module, sample: dict, text_length: int,
                   noisy: torch.Tensor | None = None) -> dict:
    """The adapter's transformer kwargs for `noisy` (B, C, F, H, W; default noise shaped like the cached clip), with
    the clip's cached text."""
    noisy = noise_like(sample) if noisy is None else noisy
    return get_family(family).transformer_kwargs(transformer, noisy, torch.tensor([400.0]),
                                                 conditioning(family, folder, [sample], text_length))


def block_input(transformer: torch.nn.Module, block: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The hidden states `block` receives in a forward on `inputs` (blocks take them first, or as `hidden_states`)."""
    seen = []
    hook = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            transformer(**inputs)
    finally:
        hook.remove()
    return seen[0]


def train_config(family: str, cache: str, model: str, out: str, **kw) -> TrainConfig:
    options = dict(cache=cache, family=family, model=model, output_dir=out, crepa_block_index=1,
                   learning_rate=1e-2, crepa_lambda=1.0, max_train_steps=2, save_every=100,
                   dataloader_num_workers=0, report_to="none", lora_rank=4)
    return TrainConfig(**(options | kw))


@pytest.fixture(scope="session")
def two_step_run(family, one_clip_cache, pipeline_folder, tmp_path_factory) -> str:
    """Output folder of two CREPA training steps, with the ComfyUI export on where ComfyUI has the family's model."""
    out = str(tmp_path_factory.mktemp(f"{family}_run") / "run")
    run_train(train_config(family, one_clip_cache, pipeline_folder, out, lora_alpha=8.0,
                           comfyui_export=get_family(family).comfyui_lora))
    return out


def test_block_tokens_fill_the_token_grid_in_raster_order(family, pipeline_folder, cached_sample):
    adapter = get_family(family)
    sample, _, text_length = cached_sample
    transformer = load_pipeline(family, pipeline_folder).transformer.eval()
    inputs = forward_inputs(family, pipeline_folder, transformer, sample, text_length)
    latent_shape = (1, *sample["latents"].shape)
    grid = adapter.token_grid(transformer, latent_shape)
    assert all(0 < cells <= size for cells, size in zip(grid, latent_shape[2:], strict=True))

    raw = []
    block = adapter.blocks(transformer)[1]
    hook = block.register_forward_hook(lambda module, args, output: raw.append(adapter.block_tokens(output)))
    try:
        with torch.no_grad(), BlockCapture(adapter, transformer, block_index=1) as capture:
            transformer(**inputs)
            student = capture.student(latent_shape)
    finally:
        hook.remove()
    assert raw[0].shape[:2] == (1, grid[0] * grid[1] * grid[2])
    assert student.shape == (1, *grid, adapter.hidden_dim(transformer))
    torch.testing.assert_close(student.flatten(1, 3), raw[0], rtol=0, atol=0)  # token (t, h, w) is t*hs*ws + h*ws + w


def test_the_student_block_is_captured_with_its_graph_however_blocks_are_called(family, pipeline_folder,
                                                                               cached_sample):
    """Forward hooks see the block's output whether the transformer calls it with keywords (LTX-Video) or positionally
    (gradient checkpointing): the gradient through the captured student is the same either way."""
    adapter = get_family(family)
    sample, _, text_length = cached_sample
    transformer = load_pipeline(family, pipeline_folder).transformer.train()
    inputs = forward_inputs(family, pipeline_folder, transformer, sample, text_length)
    latent_shape = (1, *sample["latents"].shape)
    first = adapter.blocks(transformer)[0]
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.zero_grad()
        with BlockCapture(adapter, transformer, block_index=1) as capture:
            transformer(**inputs)
            student = capture.student(latent_shape)
        student.square().mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in first.parameters() if p.grad is not None]))
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-7)


def test_a_planted_latent_lands_at_its_place_in_the_token_grid(family, pipeline_folder, cached_sample):
    adapter = get_family(family)
    sample, _, text_length = cached_sample
    transformer = load_pipeline(family, pipeline_folder).transformer.eval()
    latents = noise_like(sample)
    latent_shape = latents.shape
    grid = adapter.token_grid(transformer, latent_shape)
    block = adapter.blocks(transformer)[0]
    base = adapter.tokens_to_grid(transformer, block_input(transformer, block, forward_inputs(
        family, pipeline_folder, transformer, sample, text_length, latents)), grid)
    _, _, frames, height, width = latent_shape
    # corners that differ along t, h and w: a swapped axis or a transposed reshape moves the change elsewhere
    for t, h, w in [(frames - 1, 0, 0), (0, height - 1, 0), (0, 0, width - 1), (frames - 1, height - 1, 0)]:
        planted = latents.clone()
        planted[:, :, t, h, w] += 10.0
        inputs = forward_inputs(family, pipeline_folder, transformer, sample, text_length, planted)
        tokens = adapter.tokens_to_grid(transformer, block_input(transformer, block, inputs), grid)
        changed = (tokens - base).abs().amax(dim=(0, 4)).gt(1e-6).nonzero().tolist()
        assert changed == [[t * grid[0] // frames, h * grid[1] // height, w * grid[2] // width]], (t, h, w)


def test_a_bucket_off_the_familys_rules_fails_before_models_load(family, pipeline_folder, tiny_models, tmp_path):
    """Frames must be t_c*k+1 and sides multiples of compression x patch, read from the pipeline's configs (Wan 4k+1
    and 16, LTX-Video 8k+1 and 32); a value half a step off is refused with the rule and the nearest valid values."""
    adapter = get_family(family)
    temporal, spatial = adapter.vae_compression(load_config(adapter.vae_class(), pipeline_folder, "vae"))
    multiple = spatial * spatial_patch(load_config(adapter.transformer_class(), pipeline_folder, "transformer"))
    frames, width, height = tiny_clip_size(adapter)
    cases = [(f"target_frames = [{frames}]", f"target_frames = [{frames + temporal // 2}]",
              rf"value {frames + temporal // 2} is not {temporal}k\+1.*use {frames} or {frames + temporal}"),
             (f"resolutions = [[{width}, {height}]]", f"resolutions = [[{width + multiple // 2}, {height}]]",
              rf"\[{width + multiple // 2}, {height}\] is not a multiple of {multiple}")]
    for index, (good, bad, message) in enumerate(cases):
        config = Path(write_dataset(tmp_path / str(index), clips=1, family=family))
        config.write_text(config.read_text().replace(good, bad))
        with pytest.raises(ValueError, match=message):
            run_precompute(PrecomputeConfig(dataset_config=str(config), family=family, out=str(tmp_path / "out"),
                                            model=pipeline_folder, device="cpu", decode_workers=0,
                                            teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)))
        assert not (tmp_path / "out").exists()


def test_latents_are_normalised_as_the_pipeline_unnormalises_them(family, pipeline_folder, cached_sample):
    adapter = get_family(family)
    sample, caption, text_length = cached_sample
    pipe = load_pipeline(family, pipeline_folder)
    torch.manual_seed(0)
    frames, height, width = pixel_size(adapter, pipe, (1, *sample["latents"].shape))
    pixels = torch.rand(1, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        latents = adapter.encode_video(pipe.vae, pixels)  # as precompute caches them
        ours = adapter.decode_latents(pipe.vae, latents)
        raw = pipe.vae.encode(pixels).latent_dist.mode()

    # the pipeline's own __call__ on those latents, with a transformer that predicts zero velocity so its sampler
    # leaves them as they are; vae.decode, called through, records what the pipeline hands it and gets back
    decoded = []
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kwargs):
        output = decode(z, *args, **kwargs)
        decoded.append((z, output[0] if isinstance(output, tuple) else output.sample))
        return output

    pipe.vae.decode = recording_decode
    zero = pipe.transformer.register_forward_hook(
        lambda module, args, output: torch.utils._pytree.tree_map(torch.zeros_like, output))
    # the pipeline takes `latents=` in its transformer's layout (packed for LTX-Video, with any conditioning channels)
    layout = forward_inputs(family, pipeline_folder, pipe.transformer, sample, text_length, latents)["hidden_states"]
    try:
        with torch.no_grad():
            pipeline_call(pipe, frames, height, width, prompt=caption, latents=layout.clone(), num_inference_steps=2,
                          guidance_scale=1.0, output_type="pt")
    finally:
        zero.remove()
    ((unnormalised, pixels_out),) = decoded
    torch.testing.assert_close(unnormalised, raw, rtol=0, atol=1e-5)  # the pipeline undoes encode_video's scaling
    torch.testing.assert_close(ours, pixels_out, rtol=0, atol=1e-5)


def pipeline_call(pipe, frames: int, height: int, width: int, fps: float | None = None, **kwargs):
    """`pipe(...)` at a clip's size (and frame rate, for pipelines that take one), the frame count under the name this
    pipeline's `__call__` gives it.

    Callers take two steps: a one-step schedule ends where it starts, and a scheduler that stretches its schedule to
    a terminal sigma (LTX-Video's) divides by zero on it.
    """
    params = inspect.signature(pipe.__call__).parameters
    frames_name = "num_frames" if "num_frames" in params else "frames"
    if fps is not None and "frame_rate" in params:
        kwargs["frame_rate"] = fps
    if "use_resolution_binning" in params:  # binning snaps to the model's trained sizes; the tiny clip has its own
        kwargs["use_resolution_binning"] = False
    return pipe(**{frames_name: frames}, height=height, width=width, **kwargs)


def pixel_size(adapter, pipe, latent_shape) -> tuple[int, int, int]:
    """(frames, height, width) of the clip whose latents have `latent_shape` (B, C, F, H, W)."""
    temporal, spatial = adapter.vae_compression(pipe.vae.config)
    _, _, frames, height, width = latent_shape
    return 1 + (frames - 1) * temporal, height * spatial, width * spatial


def test_cached_inputs_condition_the_transformer_as_the_pipeline_does(family, pipeline_folder, cached_sample):
    """The transformer's first forward when the pipeline generates from the caption, against ours from the cache."""
    adapter = get_family(family)
    sample, caption, text_length = cached_sample
    pipe = load_pipeline(family, pipeline_folder)
    noisy = noise_like(sample)
    latent_shape = noisy.shape
    calls = []  # each forward's arguments by name, however the pipeline passed them; copies, as a pipeline may
    # update its latents in place after the forward
    signature = inspect.signature(pipe.transformer.forward)
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(torch.utils._pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
            dict(signature.bind(*args, **kwargs).arguments))), with_kwargs=True)
    start = forward_inputs(family, pipeline_folder, pipe.transformer, sample, text_length, noisy)["hidden_states"]
    try:
        with torch.no_grad():  # starting from our noise, in the layout the pipeline takes it
            pipeline_call(pipe, *pixel_size(adapter, pipe, latent_shape), fps=sample["fps"], prompt=caption,
                          num_inference_steps=2, guidance_scale=1.0, output_type="latent", latents=start)
    finally:
        hook.remove()
    theirs = calls[0]
    ours = adapter.transformer_kwargs(pipe.transformer, noisy, pipe.scheduler.timesteps[:1],
                                      conditioning(family, pipeline_folder, [sample], text_length))

    cached = torch.from_numpy(sample["text"]).float()
    torch.testing.assert_close(cached, theirs["encoder_hidden_states"][0, : len(cached)], rtol=0, atol=1e-5)
    if "encoder_attention_mask" in theirs:
        assert ours["encoder_attention_mask"].bool().equal(theirs["encoder_attention_mask"].bool())
    with torch.no_grad():
        expected = adapter.prediction(pipe.transformer(**theirs), latent_shape)
        torch.testing.assert_close(adapter.prediction(pipe.transformer(**ours), latent_shape), expected,
                                   rtol=0, atol=1e-5)


def test_trained_lora_loads_through_the_pipeline_and_reproduces_outputs(family, pipeline_folder, cached_sample,
                                                                      two_step_run):
    from safetensors.torch import load_file

    from train.lora import add_lora

    adapter = get_family(family)
    sample, _, text_length = cached_sample
    trained = load_pipeline(family, pipeline_folder).transformer.eval()
    add_lora(trained, 4, 8.0, 0.0, list(adapter.default_lora_targets))
    trained.load_state_dict(load_file(os.path.join(two_step_run, "checkpoint-2", "trainable.safetensors")),
                            strict=False)
    ours = lora_layers(trained)
    inputs = forward_inputs(family, pipeline_folder, trained, sample, text_length)
    with torch.no_grad():
        expected = trained(**inputs)[0]
        base = load_pipeline(family, pipeline_folder).transformer.eval()(**inputs)[0]
        assert not torch.allclose(base, expected, atol=1e-4), "the LoRA should change the outputs"
        for weights in (LORA_WEIGHTS, COMFYUI_WEIGHTS) if adapter.comfyui_lora else (LORA_WEIGHTS,):
            pipe = load_pipeline(family, pipeline_folder)
            pipe.load_lora_weights(**loadable_lora(pipe, adapter, two_step_run, weights))
            loaded = lora_layers(pipe.transformer)
            assert sorted(loaded) == sorted(ours), weights
            for name, layer in ours.items():  # every layer arrived with its weight change (a loader may fold alpha)
                (adapter_name,) = loaded[name].lora_A.keys()
                torch.testing.assert_close(loaded[name].get_delta_weight(adapter_name),
                                           layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(pipe.transformer.eval()(**inputs)[0], expected, atol=1e-5, rtol=1e-4)


def loadable_lora(pipe, adapter, folder: str, weight_name: str) -> dict:
    """The arguments of `pipe.load_lora_weights` for the LoRA file `weight_name` in `folder`.

    The file itself, when the pipeline's loader reads its names. A ComfyUI file whose names this loader does not
    convert (Kandinsky's reads diffusers names only) is what ComfyUI applies, under diffusers' names: each layer's
    ComfyUI name mapped back through the adapter's ComfyUI map (the file has no `.alpha` keys, so ComfyUI applies
    lora_B as it is: peft's scaling is folded in).
    """
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, weight_name))
    if not any(key.startswith("diffusion_model.") for key in pipe.lora_state_dict(dict(state))):
        return {"pretrained_model_name_or_path_or_dict": folder, "weight_name": weight_name}
    ours = {comfy: name for name, comfy in adapter.comfyui_modules(pipe.transformer).items()}
    converted = {}
    for key, value in state.items():
        layer, _, part = key.partition(".lora_")
        if part == "A.weight":
            converted[f"transformer.{ours[layer]}.lora_A.weight"] = value
            converted[f"transformer.{ours[layer]}.lora_B.weight"] = state[f"{layer}.lora_B.weight"]
    assert len(converted) == len(state), "every ComfyUI layer has lora_A and lora_B, and nothing else"
    return {"pretrained_model_name_or_path_or_dict": converted}


def test_clips_train_in_a_batch_as_they_train_alone(family, pipeline_folder, cached_sample, tmp_path):
    """Two clips whose captions differ in length: the batch's gradient is the mean of the clips' own gradients.

    Families whose transformer sees every text token without a mask must not pad the shorter caption.
    """
    from crepa.projector import CrepaProjector
    from crepa.schedule import CrepaWeightSchedule
    from train.lora import add_lora
    from train.trainer import StepParts, train_step

    adapter = get_family(family)
    sample, _, text_length = cached_sample
    shorter = dict(sample, key="shorter", text=sample["text"][:-2],
                   latents=sample["latents"] + torch.randn(sample["latents"].shape, generator=torch.Generator()
                                                           .manual_seed(1)).numpy())
    torch.manual_seed(0)
    transformer = load_pipeline(family, pipeline_folder).transformer.train()
    add_lora(transformer, 4, 4.0, 0.0, list(adapter.default_lora_targets))
    for layer in lora_layers(transformer).values():  # lora_B starts at zero: give lora_A a gradient too
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    projector = CrepaProjector(adapter.hidden_dim(transformer), sample["teacher"].shape[-1])
    cfg = train_config(family, "cache", pipeline_folder, str(tmp_path))
    parts = StepParts(adapter, transformer, projector, CrepaWeightSchedule(cfg.schedule_config()), cfg, {},
                      vae_compression=adapter.vae_compression(load_config(adapter.vae_class(), pipeline_folder, "vae")))
    params = [p for module in (transformer, projector) for p in module.parameters() if p.requires_grad]

    def gradients(samples: list[dict]) -> list[torch.Tensor]:
        loss, _ = train_step(parts, collate([to_tensors(s) for s in samples], text_length), 5, torch.device("cpu"))
        grads = torch.autograd.grad(loss, params)
        return grads

    batch = gradients([sample, shorter])
    alone = [(a + b) / 2 for a, b in zip(gradients([sample]), gradients([shorter]), strict=True)]
    assert all(g.abs().sum() > 0 for g in batch)
    for got, expected in zip(batch, alone, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_a_crepa_step_trains_the_lora_and_the_projector(two_step_run):
    state = torch.load(os.path.join(two_step_run, "checkpoint-2", "optimizer.pt"), weights_only=False)["optimizer"]
    lora, projector = state["param_groups"]
    for group, what in ((lora, "LoRA"), (projector, "projector")):
        # Adam keeps state only for parameters that had a gradient; step 2 reaches lora_A too (lora_B starts at 0)
        missing = [i for i in group["params"] if i not in state["state"] or not state["state"][i]["exp_avg"].any()]
        assert not missing, f"{len(missing)} of {len(group['params'])} {what} tensors had no gradient"
    rows = [json.loads(line) for line in open(os.path.join(two_step_run, "metrics.jsonl"))]
    assert all(row["crepa_loss"] != 0 for row in rows)


def test_overfitting_one_clip_lowers_the_loss_and_raises_alignment(family, one_clip_cache, pipeline_folder, tmp_path):
    out = str(tmp_path / "run")
    run_train(train_config(family, one_clip_cache, pipeline_folder, out, max_train_steps=40, lora_rank=8,
                           timestep_sampling="uniform", crepa_projector_lr=1e-2))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    first, last = rows[:8], rows[-8:]

    def mean(rows, name):
        return sum(r[name] for r in rows) / len(rows)

    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "crepa_alignment_score") > mean(first, "crepa_alignment_score") + 0.1
    assert os.path.exists(os.path.join(out, "training_curves.png"))
    for name in ("crepa_loss", "crepa_similarity_self", "crepa_weight", "lr", "grad_norm", "samples_per_second"):
        assert name in rows[-1]


def test_the_comfyui_export_is_refused_before_training_where_comfyui_has_no_model_of_the_family(
        family, one_clip_cache, pipeline_folder, tmp_path):
    if get_family(family).comfyui_lora:
        pytest.skip("ComfyUI has a model of this family: the export is allowed")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=f"ComfyUI has no {family} model.*drop --comfyui-export"):
        run_train(train_config(family, one_clip_cache, pipeline_folder, str(out), comfyui_export=True))
    assert not out.exists()


def test_defaults_are_the_pipelines(family, pipeline_folder):
    """The text length and flow shift the adapter falls back to are the ones the family's pipeline uses."""
    adapter = get_family(family)
    pipe = load_pipeline(family, pipeline_folder)
    assert inspect.signature(pipe.__call__).parameters["max_sequence_length"].default == \
        adapter.default_text_max_length
    shape = torch.Size((1, 4, 3, 4, 6))
    assert adapter.flow_shift(dict(pipe.scheduler.config), shape) == \
        adapter.flow_shift(adapter.default_scheduler_config(), shape)
