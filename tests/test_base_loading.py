"""Loading the base: fp8 weights equal a plain bf16 load quantised afterwards, and no wide copy of the model exists."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from bench.common import TensorBytes
from crepa.families import get_family
from train.base_loading import load_base
from train.precision import Fp8Linear, prepare_base, quantize_fp8

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
              text_dim=32, freq_dim=32, ffn_dim=256, num_layers=8, rope_max_seq_len=32)
"""A small Wan whose linear layers dominate its size, as in the real models (about 0.6 M parameters)."""


@pytest.fixture(scope="module", params=["single", "sharded"])
def saved(request, tmp_path_factory) -> str:
    """A pipeline folder holding only transformer/, saved in fp32 as released, in one file or in shards."""
    folder = tmp_path_factory.mktemp(f"wan_{request.param}")
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG)
    model.save_pretrained(str(folder / "transformer"), max_shard_size="400KB" if request.param == "sharded" else "5GB")
    return str(folder)


def plain_fp8(folder: str) -> torch.nn.Module:
    """What the trainer loaded before: the whole model in bf16, then quantised."""
    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    quantize_fp8(model.requires_grad_(False))
    return model


def streamed_fp8(folder: str) -> torch.nn.Module:
    return load_base(WanTransformer3DModel, folder, "transformer", None, "fp8").requires_grad_(False)


def test_fp8_load_equals_a_plain_load_then_quantise(saved):
    got, expected = streamed_fp8(saved), plain_fp8(saved)
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert got_state[name].dtype == tensor.dtype, name
        assert torch.equal(got_state[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    layers = [[name for name, m in model.named_modules() if isinstance(m, Fp8Linear)] for model in (got, expected)]
    assert layers[0] and layers[0] == layers[1]
    inputs = dict(hidden_states=torch.randn(1, 4, 3, 4, 6), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, 32), return_dict=False)
    with torch.no_grad():
        outputs = [prepare_base(model, "fp8")(**inputs)[0] for model in (got, expected)]
    torch.testing.assert_close(*outputs, rtol=0, atol=0)


def test_fp8_load_never_holds_more_than_the_final_model_and_one_layer(saved):
    """Transient bytes while loading (peak minus what stays) are bounded by one linear layer's copies; the plain
    load overshoots by the whole bf16 model."""
    largest = max(m.weight.numel() for m in WanTransformer3DModel(**CONFIG).modules() if isinstance(m, torch.nn.Linear))
    overshoot = {}
    for name, load in (("streamed", streamed_fp8), ("plain", plain_fp8)):
        with TensorBytes() as count:
            model = load(saved)
        final = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
        overshoot[name] = count.peak - count.current
        assert count.current <= final * 1.01, (name, count.current, final)
    layer_copies = largest * (4 + 2 + 4 + 1)  # one layer read in fp32, cast to bf16, scaled in fp32, stored in fp8
    assert overshoot["streamed"] <= layer_copies, overshoot
    assert overshoot["plain"] > 2 * layer_copies, overshoot  # the bound tells the two loads apart


def test_other_dtypes_and_formats_load_through_from_pretrained(saved, tmp_path):
    model = load_base(WanTransformer3DModel, saved, "transformer", None, "bf16")
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    WanTransformer3DModel(**CONFIG).save_pretrained(str(tmp_path / "bin" / "transformer"), safe_serialization=False)
    # quantised later by prepare_base
    fp8 = load_base(WanTransformer3DModel, str(tmp_path / "bin"), "transformer", None, "fp8")
    assert fp8.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    adapter = get_family("wan")
    with pytest.raises(OSError, match="could not load the transformer"):
        load_base(adapter.transformer_class(), str(tmp_path / "missing"), "transformer", None, "fp8")


def test_fp8_base_loaded_by_layer_can_be_wrapped_for_data_parallel_training(saved):
    """DDP broadcasts module states at start and gloo has no fp8: the layers quantised while loading, now inside
    LoRA layers, must be on the model's ignore list under their final names."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from train.lora import add_lora

    model = load_base(WanTransformer3DModel, saved, "transformer", None, "fp8")
    add_lora(model, 4, 4, 0.0, list(get_family("wan").default_lora_targets))
    prepare_base(model, "fp8")
    assert "blocks.0.attn1.to_q.base_layer.weight" in model._ddp_params_and_buffers_to_ignore
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        DistributedDataParallel(model)
    finally:
        dist.destroy_process_group()
