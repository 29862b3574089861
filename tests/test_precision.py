"""Frozen base weights in bf16 or scaled fp8: storage, layer error, trained LoRAs, loss curves."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_config
from torch import nn

import train.trainer
from train.config import TrainConfig
from train.precision import FP8, Fp8Linear, quantize_fp8
from train.trainer import run_train

FP8_LAYER_RTOL = 0.05
"""Relative L2 error of an fp8 layer's output against fp32; measured 0.017-0.027 with bf16 compute at weight
scales 0.002 to 300 (a plain cast to fp8 without a scale: 0.18 at 0.002, 0.21 at 300)."""
BF16_LAYER_RTOL = 0.01
"""The same for a bf16 layer; measured about 0.003."""
LOSS_CURVE_ATOL = 0.005
"""Largest per-step loss difference, bf16 base against fp32, over 10 steps of the tiny model (losses about 1.3);
measured 0.001."""


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().float() - expected.detach()).norm() / expected.detach().norm())


@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_trainer_stores_the_base_in_the_requested_dtype_and_trains_fp32(tmp_path, trained_cache, tiny_models,
                                                                         monkeypatch, base_dtype):
    seen = {}
    build_optimizer = train.trainer.build_optimizer

    def spy(cfg, transformer, projector):  # the transformer as the trainer prepared it, before step 0
        seen["transformer"] = transformer
        return build_optimizer(cfg, transformer, projector)

    monkeypatch.setattr(train.trainer, "build_optimizer", spy)
    out = str(tmp_path / "run")
    run_train(train_config(trained_cache, tiny_models, out, max_train_steps=2, base_dtype=base_dtype))

    model = seen["transformer"]
    block_weights = {name: p for name, p in model.named_parameters()
                     if (".ffn." in name or ".base_layer." in name) and name.endswith(".weight")}
    expected = FP8 if base_dtype == "fp8" else torch.bfloat16
    assert block_weights and {p.dtype for p in block_weights.values()} == {expected}
    if base_dtype == "fp8":
        layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        assert layers and all(m.weight_scale.dtype == torch.float32 and m.weight_scale > 0 for m in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    state = torch.load(os.path.join(out, "checkpoint-2", "optimizer.pt"), weights_only=False)["optimizer"]["state"]
    moments = [t for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)


@pytest.mark.parametrize("magnitude", [0.002, 0.02, 300.0])
def test_fp8_layer_matches_the_fp32_layer(magnitude):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    with torch.no_grad():
        linear.weight.normal_(0, magnitude)  # without a scale 0.002 falls into fp8's subnormals and 300 saturates
    x = torch.randn(4, 9, 256, requires_grad=True)
    expected = linear(x)
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)

    fp8 = Fp8Linear(linear.requires_grad_(False))
    got = fp8(x)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert fp8.weight.dtype == FP8 and got.dtype == torch.bfloat16
    assert relative_error(got, expected) < FP8_LAYER_RTOL
    assert relative_error(got_grad, expected_grad) < FP8_LAYER_RTOL
    bf16 = linear.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert relative_error(bf16, expected) < BF16_LAYER_RTOL


def test_quantize_fp8_skips_trainable_and_the_models_own_high_precision_layers(tiny_models):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_models["wan"], subfolder="transformer",
                                                  torch_dtype=torch.bfloat16).requires_grad_(False)
    model.blocks[0].ffn.net[2].requires_grad_(True)
    count = quantize_fp8(model)
    assert count > 0
    names = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert not any("condition_embedder" in n or "norm" in n for n in names)
    assert "blocks.0.ffn.net.2" not in names and "blocks.0.attn1.to_q" in names
    assert model.scale_shift_table.dtype == torch.float32  # diffusers keeps it in fp32 when loading bf16


@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_lora_trained_on_a_narrow_base_loads_in_the_wan_pipeline_and_generates(tmp_path, trained_cache, tiny_models,
                                                                               base_dtype):
    from diffusers import WanPipeline

    out = str(tmp_path / "run")
    result = run_train(train_config(trained_cache, tiny_models, out, base_dtype=base_dtype))
    saved = load_file(result.lora_path)
    assert saved and all(t.dtype == torch.float32 for t in saved.values())

    def generate(pipe):
        return pipe(prompt="a red ball moves left", height=32, width=32, num_frames=5, num_inference_steps=2,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    pipe = WanPipeline.from_pretrained(tiny_models["wan"])
    base = generate(pipe)
    pipe.load_lora_weights(out)
    frames = generate(pipe)
    assert frames.shape == base.shape and frames.shape[0] == 5
    assert (frames == frames).all() and not (frames == base).all(), "the LoRA should change the video"


def test_bf16_base_loss_curve_follows_the_fp32_one(tmp_path, trained_cache, tiny_models):
    curves = {}
    for base_dtype in ("fp32", "bf16"):
        out = str(tmp_path / base_dtype)
        run_train(train_config(trained_cache, tiny_models, out, max_train_steps=10, base_dtype=base_dtype))
        curves[base_dtype] = losses(out)
    assert len(curves["bf16"]) == 10 and curves["bf16"] != curves["fp32"], "the bf16 base should be in use"
    gap = max(abs(a - b) for a, b in zip(curves["bf16"], curves["fp32"], strict=True))
    assert gap < LOSS_CURVE_ATOL, (gap, curves)


def test_narrow_base_with_full_fine_tune_is_refused():
    with pytest.raises(ValueError, match="--full .*--base-dtype fp32"):
        TrainConfig(full=True, base_dtype="bf16")
    with pytest.raises(ValueError, match="--base-dtype='int4'; use one of bf16, fp16, fp32, fp8"):
        TrainConfig(base_dtype="int4")
    assert TrainConfig().base_dtype == "bf16" and TrainConfig(full=True).base_dtype == "fp32"


def test_precision_benchmark_runs_and_reports_every_base_dtype():
    from test_bench import run_bench

    out = run_bench("bench.precision", "--layers", "1", "--steps", "2", "--rounds", "1", "--lora-rank", "4")
    assert "| Wan 2.1 14B | 14.29 B | 53.23 | 26.67 |" in out
    for dtype in ("fp32", "bf16", "fp8"):
        assert f"| {dtype} |" in out


def test_fp8_base_can_be_wrapped_for_data_parallel_training(tiny_models):
    """DDP broadcasts module states at start; gloo has no fp8, and frozen weights read from one checkpoint need none."""
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel
    from torch.nn.parallel import DistributedDataParallel

    from crepa.families import get_family
    from train.lora import add_lora
    from train.precision import prepare_base

    model = WanTransformer3DModel.from_pretrained(tiny_models["wan"], subfolder="transformer",
                                                  torch_dtype=torch.bfloat16)
    add_lora(model, 4, 4, 0.0, list(get_family("wan").default_lora_targets))
    prepare_base(model, "fp8")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()
