"""Validation samples during training (transformer alone, cached text) and `crepa decode` (VAE alone) afterwards.

The reference for the samples is what users run: WanPipeline with the trained LoRA loaded, generating latents from
the same noise and the same (cached) prompt embeddings, with its own scheduler and guidance.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from test_train import forbid_encoders, train_config

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.errors import UserError
from crepa.families import get_family
from crepa_cli.main import main as crepa_cli
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.pipeline import run_precompute
from train.data import prompt_conditioning
from train.experts import Stage
from train.loader import build_data
from train.trainer import run_train
from train.validation import Validation, flow_sigmas, initial_noise, sample_flow

PROMPTS = ("a red ball bouncing", "two blue squares sliding slowly")


WHOLE_RANGE = Stage("transformer", "all", (0.0, 1.0))


def precompute_again(cache: str, models: dict, **options):
    """Rerun the precompute that made the `trained_cache` fixture (its plan names the dataset config) on `cache`."""
    (plan,) = CacheStore.open(cache).plans().values()
    return run_precompute(PrecomputeConfig(
        dataset_config=plan["dataset_config"], family="wan", out=cache, model=models["wan"], device="cpu",
        decode_workers=0, teacher=TeacherSettings(encoder=models["dinov2"], image_size=56), **options))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")
    return str(path)


@pytest.fixture(scope="module")
def validation_cache(tmp_path_factory, trained_cache, tiny_models, prompts_file) -> tuple[str, object]:
    """A copy of `trained_cache` whose precompute was rerun with --validation-prompts, and that rerun's summary."""
    cache = str(tmp_path_factory.mktemp("validation_cache") / "cache")
    shutil.copytree(trained_cache, cache)
    return cache, precompute_again(cache, tiny_models, validation_prompts=prompts_file)


@pytest.fixture(scope="module")
def validation_run(tmp_path_factory, validation_cache, tiny_models, prompts_file) -> str:
    """3 steps with validation samples after steps 2 and 3 (guidance 4, 3 Euler steps), fp32 base weights."""
    out = str(tmp_path_factory.mktemp("validation_run") / "run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_encoders(monkeypatch)
        result = run_train(train_config(validation_cache[0], tiny_models, out, max_train_steps=3, base_dtype="fp32",
                                        report_to="tensorboard", validation_prompts=prompts_file, validation_every=2,
                                        validation_steps=3, validation_guidance=4.0))
    assert result.validation_dir == os.path.join(out, "validation")
    return out


# ---- precompute: the empty prompt and the validation prompts are cached like captions


def test_the_empty_prompt_is_cached_as_the_pipeline_encodes_it(trained_cache, tiny_models):
    from diffusers import WanPipeline

    view = CacheView(CacheStore.open(trained_cache), "wan", with_teacher=False)
    assert "" in view.prompts() and all(clip.caption for clip in view.clips), "no clip has the empty caption"
    cached = torch.from_numpy(view.prompt_text("")["text"]).float()
    pipe = WanPipeline.from_pretrained(tiny_models["wan"])
    theirs, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)
    assert cached.shape == (1, 16), "one token: the end-of-sequence token"
    torch.testing.assert_close(cached, theirs[0, :1], rtol=0, atol=1e-3)  # stored as float16
    assert not theirs[0, 1:].any(), "the pipeline zero-pads, as training does"


def test_validation_prompts_are_added_once_and_reruns_compute_nothing(validation_cache, tiny_models, prompts_file):
    cache, summary = validation_cache
    assert summary.computed == {"latents": 0, "teacher": 0, "text": 2}, "only the two new prompts"
    assert summary.reused["text"] == 4, "three captions and the empty prompt were there"
    view = CacheView(CacheStore.open(cache), "wan")
    assert view.prompts() == ["", *sorted(PROMPTS)]
    assert all(view.prompt_text(prompt) is not None for prompt in PROMPTS)
    again = precompute_again(cache, tiny_models, validation_prompts=prompts_file)
    assert again.computed == {"latents": 0, "teacher": 0, "text": 0}
    without = precompute_again(cache, tiny_models)  # e.g. after adding clips: the prompts stay served
    assert without.computed == {"latents": 0, "teacher": 0, "text": 0}
    assert CacheView(CacheStore.open(cache), "wan").prompts() == ["", *sorted(PROMPTS)]


# ---- the sampler


@pytest.mark.parametrize("shift, steps, extra", [(3.0, 30, {}), (5.0, 4, {}), (1.0, 1, {}),
                                                  (2.05, 20, {"shift_terminal": 0.1})])
def test_sigmas_are_the_flow_match_euler_schedulers(shift, steps, extra):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, **extra)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift, dict(scheduler.config)), scheduler.sigmas, rtol=0, atol=0)


def test_sigmas_with_dynamic_shifting_are_the_schedulers_for_mu_log_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1)
    scheduler.set_timesteps(8, mu=math.log(2.5))
    torch.testing.assert_close(flow_sigmas(8, 2.5, dict(scheduler.config)), scheduler.sigmas, rtol=0, atol=1e-7)


class ExactVelocity(torch.nn.Module):
    """A 'transformer' (Wan's forward signature) whose velocity flows straight to `targets[text]`: the text it is
    given picks the target (row 0 of `texts` -> targets[0], ...). It records the timesteps it sees."""

    def __init__(self, texts: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        self.texts, self.targets, self.timesteps = texts, targets, []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.timesteps.append(timestep.clone())
        which = [next(i for i, t in enumerate(self.texts) if torch.equal(t, row)) for row in encoder_hidden_states]
        target = self.targets[which]  # (B, C, F, H, W)
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        return ((hidden_states - target) / sigma,)  # x_t = (1 - s) x_0 + s n  =>  n - x_0 = (x_t - x_0) / s


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_sampler_reaches_the_target_of_an_exact_velocity(guidance):
    adapter = get_family("wan")
    generator = torch.Generator().manual_seed(0)
    texts = torch.randn(2, 1, 5, 16, generator=generator)  # prompt, empty prompt
    targets = torch.randn(2, 4, 3, 4, 6, generator=generator)
    model = ExactVelocity(texts[:, 0], targets)
    prompt = prompt_conditioning([{"text": texts[0, 0].numpy()}], 5)
    empty = prompt_conditioning([{"text": texts[1, 0].numpy()}], 5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = flow_sigmas(6, 3.0, dict(scheduler.config))
    reached = sample_flow(adapter, lambda sigma: model, initial_noise(1, (4, 3, 4, 6)), sigmas, prompt, empty, guidance)
    # v = v_empty + g (v_prompt - v_empty) flows straight to empty + g (prompt - empty)
    torch.testing.assert_close(reached[0], targets[1] + guidance * (targets[0] - targets[1]), rtol=0, atol=1e-5)
    seen = torch.cat(model.timesteps[:: 1 if guidance == 1.0 else 2])
    torch.testing.assert_close(seen, scheduler.timesteps, rtol=0, atol=0)  # the pipeline's timesteps, in order


# ---- during training


def test_validation_latents_are_what_the_pipeline_generates_with_the_lora(validation_run, validation_cache,
                                                                         tiny_models):
    from diffusers import WanPipeline

    for step in (2, 3):
        for index, prompt in enumerate(PROMPTS):
            info = json.load(open(os.path.join(validation_run, "validation", f"step-{step}", f"{index}.json")))
            assert info | {"model": None} == {
                "prompt": prompt, "negative_prompt": "", "seed": index, "step": step, "latent_shape": [4, 3, 6, 8],
                "pixel_size": [9, 48, 64], "family": "wan", "model": None, "transformer": None, "num_steps": 3,
                "guidance": 4.0, "shift": 3.0}
    view = CacheView(CacheStore.open(validation_cache[0]), "wan", with_teacher=False)
    text_length = view.text.attrs["max_length"]
    empty = prompt_conditioning([view.prompt_text("")], text_length)
    pipe = WanPipeline.from_pretrained(tiny_models["wan"])
    pipe.load_lora_weights(validation_run, weight_name="pytorch_lora_weights.safetensors")
    for index, prompt in enumerate(PROMPTS):
        ours = load_file(os.path.join(validation_run, "validation", "step-3", f"{index}.safetensors"))["latents"]
        text = prompt_conditioning([view.prompt_text(prompt)], text_length)
        with torch.no_grad():
            theirs = pipe(prompt_embeds=text.text, negative_prompt_embeds=empty.text, height=48, width=64,
                          num_frames=9, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                          latents=initial_noise(index, (4, 3, 6, 8))).frames
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-5)
    step_2 = load_file(os.path.join(validation_run, "validation", "step-2", "0.safetensors"))["latents"]
    assert not torch.allclose(step_2, load_file(os.path.join(validation_run, "validation", "step-3",
                                                             "0.safetensors"))["latents"]), "the LoRA trained"


def test_a_prompt_missing_from_the_cache_names_the_precompute_command(tmp_path, trained_cache, tiny_models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green circle\n")
    with pytest.raises(ValueError, match=r"--validation-prompts needs the text of prompt\(s\) 'a green circle'.*"
                                         r"rerun `crepa precompute --config \S+dataset.toml --family wan --out "
                                         rf"{trained_cache} --validation-prompts {prompts}`"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "run"), validation_prompts=str(prompts)))
    assert not os.path.exists(tmp_path / "run")


def test_a_validation_size_the_model_cannot_take_fails_before_step_0(tmp_path, validation_cache, tiny_models,
                                                                     prompts_file):
    with pytest.raises(ValueError, match=r"--validation-size 8 48 64 does not fit.*frames = 4k\+1 \(e\.g\. 5\).*"
                                         r"multiples of 16"):
        run_train(train_config(validation_cache[0], tiny_models, str(tmp_path / "run"),
                               validation_prompts=prompts_file, validation_size=[8, 48, 64]))


def test_validation_size_sets_the_sample_shape_else_the_first_bucket_does(tmp_path, validation_cache, tiny_models,
                                                                          prompts_file):
    adapter = get_family("wan")
    for size, latents, pixels in ((None, (4, 3, 6, 8), [9, 48, 64]), ([5, 32, 16], (4, 2, 4, 2), [5, 32, 16])):
        cfg = train_config(validation_cache[0], tiny_models, str(tmp_path), validation_prompts=prompts_file,
                           validation_size=size)
        validation = Validation.build(cfg, adapter, build_data(cfg, False, 0, 1), [WHOLE_RANGE])
        assert (validation.latent_shape, validation.pixel_size) == (latents, pixels)
        assert validation.text.text.shape == (2, 512, 16) and validation.empty.text.shape == (1, 512, 16)


def test_validation_needs_every_expert_of_the_pipeline(tmp_path, validation_cache, tiny_models, prompts_file):
    cfg = train_config(validation_cache[0], tiny_models, str(tmp_path), validation_prompts=prompts_file, expert="high")
    with pytest.raises(UserError, match=r"samples with every expert.*--expert high trains only transformer \(high"):
        Validation.build(cfg, get_family("wan"), build_data(cfg, False, 0, 1),
                         [Stage("transformer", "high", (0.75, 1.0))])


# ---- decoding afterwards


def test_crepa_decode_writes_videos_a_contact_sheet_and_a_tensorboard_image(validation_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = CliRunner().invoke(crepa_cli, ["decode", validation_run], prog_name="crepa")
    assert result.exit_code == 0, result.output
    for step in (2, 3):
        folder = os.path.join(validation_run, "validation", f"step-{step}")
        for index in range(len(PROMPTS)):
            with av.open(os.path.join(folder, f"{index}.mp4")) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
            assert np.std(np.stack(frames)) > 1, "decoded pixels, not a blank video"
        with Image.open(os.path.join(folder, "contact_sheet.png")) as sheet:
            assert sheet.size == (8 * 64, len(PROMPTS) * 48)  # 8 of the 9 frames across, one row per prompt
    events = EventAccumulator(os.path.join(validation_run, "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("validation/contact_sheet")] == [2, 3]


def test_shards_carry_the_prompts_and_crepa_train_decodes_after_training(tmp_path, validation_cache, tiny_models,
                                                                        prompts_file):
    from crepa.cache.export import export_view
    from crepa.cache.wds import iter_webdataset

    shards = str(tmp_path / "shards")
    export_view(validation_cache[0], shards)
    texts = {s["json"]["caption"]: s["text.npy"] for s in iter_webdataset([os.path.join(shards, "prompts.tar")])}
    view = CacheView(CacheStore.open(validation_cache[0]), "wan", with_teacher=False)
    assert sorted(texts) == ["", *sorted(PROMPTS)]
    for prompt, text in texts.items():
        np.testing.assert_array_equal(text, view.prompt_text(prompt)["text"])
    out = str(tmp_path / "run")
    options = ["--cache", shards, "--model", tiny_models["wan"], "--output-dir", out, "--max-train-steps", "2",
               "--crepa-block-index", "1", "--lora-rank", "4", "--dataloader-num-workers", "0", "--report-to", "none",
               "--caption-dropout", "0.5", "--validation-prompts", prompts_file, "--validation-every", "2",
               "--validation-steps", "1", "--validation-size", "5", "32", "32", "--decode-validation"]
    result = CliRunner().invoke(crepa_cli, ["train", *options], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert f"step 2: 2 video(s), contact sheet {out}/validation/step-2/contact_sheet.png" in result.output
    with av.open(os.path.join(out, "validation", "step-2", "1.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    assert json.load(open(os.path.join(out, "train_config.json")))["validation_size"] == [5, 32, 32]


def test_decode_without_validation_samples_says_how_to_get_them(tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps({"family": "wan", "model": str(tmp_path)}))
    result = CliRunner().invoke(crepa_cli, ["decode", str(tmp_path)], prog_name="crepa")
    assert result.exit_code == 1 and "holds no validation samples" in result.output
    assert "train with --validation-prompts FILE" in result.output and "Traceback" not in result.output
