"""Training end to end on a tiny cache: resume, errors, DDP, streaming, no encoders in memory.

Overfitting and the LoRA reload through the pipeline are checked for every family in test_family_conformance.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from crepa.families import get_family
from crepa.families.loading import load_pretrained
from crepa.schedule import CrepaWeightSchedule
from train.config import TrainConfig
from train.data import BucketBatchSampler
from train.flow_matching import TimestepSampling, sample_noise
from train.trainer import StepParts, run_train, scheduler_settings, train_step


def train_config(cache: str, models: dict, out: str, **kw) -> TrainConfig:
    options = dict(cache=cache, family="wan", model=models["wan"], output_dir=out, crepa_block_index=1,
                   learning_rate=1e-3, max_train_steps=4, save_every=100, dataloader_num_workers=0,
                   report_to="none", lora_rank=4)
    return TrainConfig(**(options | kw))


TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
"""The launcher's command line for 2 local processes; the gloo backend on CPU."""


def run_two_processes(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`args` (a script, or -m and a module) on 2 processes with this checkout's packages first; must succeed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*TWO_PROCESSES, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if "terminate called without an active exception" in done.stderr:
        # gloo on an overloaded CPU now and then aborts a rank from inside its own threads (SIGABRT, no Python
        # error); that run says nothing about the code under test, so it runs once more and must pass then
        done = subprocess.run([*TWO_PROCESSES, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def wan_720p(tmp_path_factory, tiny_models) -> str:
    """The tiny Wan pipeline with the scheduler of Wan's 720p checkpoints (shift 5.0)."""
    folder = str(tmp_path_factory.mktemp("wan720") / "wan")
    shutil.copytree(tiny_models["wan"], folder)
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def test_flow_shift_is_the_pipeline_schedulers(tmp_path, trained_cache, tiny_models, wan_720p, capsys):
    out = str(tmp_path / "run")
    run_train(train_config(trained_cache, tiny_models, out, model=wan_720p, max_train_steps=2))
    assert [row["flow_shift"] for row in metrics(out)] == [5.0, 5.0]
    source = os.path.join(wan_720p, "scheduler", "scheduler_config.json")
    assert f"flow shift from {source}" in capsys.readouterr().out


def test_flow_shift_without_a_scheduler_is_the_family_default_and_says_so(tmp_path, trained_cache, tiny_models,
                                                                           capsys):
    model = str(tmp_path / "wan")
    shutil.copytree(tiny_models["wan"], model, ignore=shutil.ignore_patterns("scheduler"))
    out = str(tmp_path / "run")
    run_train(train_config(trained_cache, tiny_models, out, model=model, max_train_steps=1))
    assert metrics(out)[0]["flow_shift"] == get_family("wan").default_flow_shift
    assert "flow shift from the wan default scheduler config {'shift': 3.0} (the pipeline has none" in \
        capsys.readouterr().out


def test_drawn_sigmas_are_the_pipeline_schedulers(tmp_path, trained_cache, tiny_models, wan_720p):
    cfg = train_config(trained_cache, tiny_models, str(tmp_path), model=wan_720p, crepa_enabled=False,
                       timestep_sampling="uniform")
    adapter = get_family("wan")
    transformer = load_pretrained(adapter.transformer_class(), wan_720p, "transformer")
    parts = StepParts(adapter, transformer, None, CrepaWeightSchedule(cfg.schedule_config()), cfg,
                      scheduler_settings(cfg, adapter)[0])
    seen = {}
    transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    keys = [f"clip{i}" for i in range(16)]
    batch = {"keys": keys, "latents": torch.randn(16, 4, 3, 4, 6), "text": torch.randn(16, 5, 16),
             "text_mask": torch.ones(16, 5, dtype=torch.bool)}
    with torch.no_grad():
        train_step(parts, batch, 3, torch.device("cpu"))
    # the same per-clip draws before any shift (shift 1 is the identity), shifted by diffusers' own scheduler
    _, raw = sample_noise(keys, (4, 3, 4, 6), cfg.seed, 3, TimestepSampling("uniform"), torch.device("cpu"))
    reference = FlowMatchEulerDiscreteScheduler(shift=5.0)
    reference.set_timesteps(sigmas=raw.tolist())
    torch.testing.assert_close(seen["timestep"], reference.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize(("scheme", "shift"), [("shift", 5.0), ("sigmoid", 1.0)])
def test_the_transformer_gets_timesteps_of_the_asked_density_and_range(tmp_path, trained_cache, tiny_models, wan_720p,
                                                                     scheme, shift):
    cfg = train_config(trained_cache, tiny_models, str(tmp_path), model=wan_720p, crepa_enabled=False,
                       timestep_sampling=scheme, min_timestep=300, max_timestep=450)
    adapter = get_family("wan")
    transformer = load_pretrained(adapter.transformer_class(), wan_720p, "transformer")
    parts = StepParts(adapter, transformer, None, CrepaWeightSchedule(cfg.schedule_config()), cfg,
                      scheduler_settings(cfg, adapter)[0])
    seen = {}
    transformer.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    keys = [f"clip{i}" for i in range(32)]
    batch = {"keys": keys, "latents": torch.randn(32, 4, 3, 4, 6), "text": torch.randn(32, 5, 16),
             "text_mask": torch.ones(32, 5, dtype=torch.bool)}
    with torch.no_grad():
        _, step_metrics = train_step(parts, batch, 3, torch.device("cpu"))
    assert step_metrics["flow_shift"] == shift  # the scheduler's 5.0, which `sigmoid` does not apply
    assert seen["timestep"].min() >= 300 - 1e-3 and seen["timestep"].max() <= 450 + 1e-3
    sampling = TimestepSampling(scheme, 5.0, sigmoid_scale=cfg.sigmoid_scale, min_timestep=300, max_timestep=450)
    _, sigmas = sample_noise(keys, (4, 3, 4, 6), cfg.seed, 3, sampling, torch.device("cpu"))
    torch.testing.assert_close(seen["timestep"], sigmas * 1000, rtol=0, atol=0)


def test_resume_equals_uninterrupted(tmp_path, trained_cache, tiny_models):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_train(train_config(trained_cache, tiny_models, straight, max_train_steps=6))
    run_train(train_config(trained_cache, tiny_models, interrupted, max_train_steps=4))
    run_train(train_config(trained_cache, tiny_models, interrupted, max_train_steps=6, resume="latest"))
    a = load_file(os.path.join(straight, "checkpoint-6", "trainable.safetensors"))
    b = load_file(os.path.join(interrupted, "checkpoint-6", "trainable.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    pa = load_file(os.path.join(straight, "crepa_projector.safetensors"))
    pb = load_file(os.path.join(interrupted, "crepa_projector.safetensors"))
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=1e-6)


def test_mismatches_fail_before_the_first_step(tmp_path, trained_cache, tiny_models):
    from crepa.families import get_family

    with pytest.raises(ValueError, match=r"crepa_block_index=7 is out of range.*0\.\.2"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "a"), crepa_block_index=7))
    with pytest.raises(ValueError, match="no wan teacher features for encoder 'dinov2_vitl14'"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "b"), crepa_encoder="dinov2_vitl14"))
    with pytest.raises(ValueError, match="unsupported model family 'ltx'"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "c"), family="ltx"))
    adapter = get_family("wan")
    wide = adapter.transformer_class()(**(adapter.tiny_transformer_config() | {"in_channels": 8}))
    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="cache latents have 4 channels but the wan transformer takes 8"):
        run_train(train_config(trained_cache, tiny_models, str(tmp_path / "d"), transformer=str(tmp_path / "wide")))
    assert not os.path.exists(tmp_path / "d" / "metrics.jsonl")


def forbid_encoders(monkeypatch) -> None:
    """Constructing the VAE, the text encoder, a vision encoder or a tokenizer fails the test."""
    import diffusers
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("training must not build this model")

    for cls in (diffusers.AutoencoderKLWan, transformers.UMT5EncoderModel, transformers.Dinov2Model,
                transformers.Dinov2WithRegistersModel, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "__init__", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


def test_training_never_constructs_vae_or_encoders(tmp_path, trained_cache, tiny_models, monkeypatch):
    forbid_encoders(monkeypatch)
    result = run_train(train_config(trained_cache, tiny_models, str(tmp_path / "run"), max_train_steps=2))
    assert result.steps == 2 and os.path.exists(result.lora_path)


def test_backbone_mode_needs_no_teacher_set(tmp_path, trained_cache, tiny_models):
    out = str(tmp_path / "run")
    run_train(train_config(trained_cache, tiny_models, out, crepa_block_index=0, crepa_use_backbone_features=True,
                           crepa_teacher_block_index=2, max_train_steps=2))
    assert "crepa_alignment_score" in metrics(out)[-1]


def test_streams_from_webdataset_shards(tmp_path, trained_cache, tiny_models):
    from crepa.cache.export import export_view

    shards = str(tmp_path / "shards")
    export_view(trained_cache, shards, family="wan", maxcount=2)
    result = run_train(train_config(shards, tiny_models, str(tmp_path / "run"), max_train_steps=3))
    assert result.steps == 3


def test_bucket_sampler_gives_ranks_disjoint_deterministic_batches():
    groups = ["a"] * 5 + ["b"] * 6
    ranks = [BucketBatchSampler(groups, [1] * 11, batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    batches = [s.epoch_batches(0) for s in ranks]
    flat = [i for rank in batches for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) and len(batches[0]) == len(batches[1])
    for rank in batches:
        for batch in rank:
            assert len({groups[i] for i in batch}) == 1, "a batch never mixes buckets"
    assert batches[0] == ranks[0].epoch_batches(0) and batches[0] != ranks[0].epoch_batches(1)
    ranks[0].set_epoch(0, skip=1)
    assert list(ranks[0]) == batches[0][1:]


def test_two_processes_train_the_weights_one_process_trains(tmp_path, trained_cache, tiny_models):
    """2 ranks x batch 1 and 1 process x batch 1 x accumulation 2 take the same 2 clips per step."""
    single, out = str(tmp_path / "single"), str(tmp_path / "ddp")
    options = dict(max_train_steps=3, num_repeats=2)  # 6 clips an epoch: both runs take clips (2s, 2s+1) at step s
    run_train(train_config(trained_cache, tiny_models, single, gradient_accumulation_steps=2, **options))
    config = str(tmp_path / "ddp.json")
    train_config(trained_cache, tiny_models, out, **options).save(config)
    done = run_two_processes("-m", "train", "--config", config)
    assert "2 process(es)" in done.stdout
    for name in (os.path.join("checkpoint-3", "trainable.safetensors"), "crepa_projector.safetensors"):
        expected, got = load_file(os.path.join(single, name)), load_file(os.path.join(out, name))
        # float32 sums in another order (DDP's average vs accumulation, thread counts): seen up to 1.1e-6 apart;
        # splitting the global batch's noise by rank instead of by clip puts them 3e-3 apart
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-5)

    rerun = str(tmp_path / "rerun")
    saved_config = os.path.join(out, "train_config.json")
    done = subprocess.run([sys.executable, "-m", "crepa_cli", "train", "--config", saved_config, "--output-dir", rerun],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.load(open(os.path.join(rerun, "train_config.json")))
    assert saved["output_dir"] == rerun and saved["max_train_steps"] == 3
