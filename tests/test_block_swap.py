"""`--blocks-to-swap`: the same training with the last blocks' frozen weights kept off the device between uses."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_config
from torch.utils.checkpoint import checkpoint

import train.trainer
from train.block_swap import swap_blocks
from train.config import TrainConfig
from train.lora import add_lora
from train.trainer import run_train


def test_swapped_training_reaches_the_same_lora_and_projector(tmp_path, trained_cache, tiny_models, monkeypatch):
    seen = {}
    build_optimizer = train.trainer.build_optimizer

    def spy(cfg, transformer, projector):
        optimizer = build_optimizer(cfg, transformer, projector)
        seen["transformer"], seen["optimizer"] = transformer, optimizer
        return optimizer

    plain, swapped = str(tmp_path / "plain"), str(tmp_path / "swapped")
    run_train(train_config(trained_cache, tiny_models, plain))
    monkeypatch.setattr(train.trainer, "build_optimizer", spy)
    # blocks 1 and 2 of 3 swapped; CREPA reads block 1's output
    run_train(train_config(trained_cache, tiny_models, swapped, blocks_to_swap=2))

    for name in ("pytorch_lora_weights.safetensors", "crepa_projector.safetensors"):
        expected, got = load_file(os.path.join(plain, name)), load_file(os.path.join(swapped, name))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    lora = load_file(os.path.join(swapped, "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("transformer.blocks.2.") and v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)

    model, optimizer = seen["transformer"], seen["optimizer"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in trainable]
    block = model.blocks[2].attn1.to_q
    assert block.lora_A["default"].weight.numel() > 0, "trainable weights stay in place"
    assert block.base_layer.weight.numel() == 0, "a swapped block holds no frozen weights between steps"
    assert model.blocks[0].attn1.to_q.base_layer.weight.numel() > 0, "unswapped blocks keep theirs"


@pytest.mark.parametrize("reentrant", [False, True])
def test_every_block_runs_with_its_weights_and_at_most_two_swapped_blocks_are_present(wan, reentrant):
    """diffusers checkpoints without reentry; with it, a block's backward runs right after its recompute's forward
    hooks, so those must not free its weights."""
    adapter, _ = wan
    torch.manual_seed(0)
    model = adapter.transformer_class()(**adapter.tiny_transformer_config())
    add_lora(model, 4, 4, 0.0, list(adapter.default_lora_targets))
    with torch.no_grad():  # a zero LoRA B would leave the A weights without gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    if reentrant:
        model.enable_gradient_checkpointing(partial(checkpoint, use_reentrant=True))
    sizes = [sum(p.numel() for p in block.parameters() if not p.requires_grad) for block in model.blocks]
    swap_blocks(adapter, model, 3, torch.device("cpu"))
    calls = []

    def record(index):
        def hook(_module, _args):  # registered after the swap's own hooks, so it sees what the block runs with
            present = [i for i, block in enumerate(model.blocks)
                       if sum(p.numel() for p in block.parameters() if not p.requires_grad) == sizes[i]]
            calls.append((index, present))
        return hook

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(record(index))
    latents = torch.randn(1, 4, 3, 4, 6, requires_grad=True)  # reentrant checkpoints pass gradients only then
    model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 16),
          return_dict=False)[0].pow(2).mean().backward()

    assert [index for index, _ in calls] == [0, 1, 2, 2, 1, 0], "forward, then each block's recompute in backward"
    for index, present in calls:
        assert index in present and len(present) <= 2, (index, present)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_blocks_to_swap_out_of_range_fails_before_training(tmp_path, trained_cache, tiny_models):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--blocks-to-swap 4 is out of range: the wan transformer has 3 blocks: "
                                         r"swap 1\.\.3 blocks"):
        run_train(train_config(trained_cache, tiny_models, str(out), blocks_to_swap=4))
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="--blocks-to-swap streams the frozen base weights"):
        TrainConfig(full=True, blocks_to_swap=2)
    with pytest.raises(ValueError, match=r"--blocks-to-swap=-1 is out of range x>=0"):
        TrainConfig(blocks_to_swap=-1)
