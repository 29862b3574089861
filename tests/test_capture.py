"""Block capture on a tiny random WanTransformer3DModel."""

import pytest
import torch

from crepa.capture import BlockCapture
from crepa.families import get_family


@pytest.fixture(scope="module")
def wan():
    adapter = get_family("wan")
    torch.manual_seed(0)
    transformer = adapter.transformer_class()(**adapter.tiny_transformer_config()).eval()
    return adapter, transformer


def wan_inputs(batch=2, frames=3, height=4, width=6):
    torch.manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 5, 16),
        return_dict=False,
    )


def test_captured_tokens_are_the_block_output_in_thw_order(wan):
    adapter, transformer = wan
    inputs = wan_inputs()
    latents = inputs["hidden_states"]
    seen = {}
    block = adapter.blocks(transformer)[1]
    pre = block.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    post = block.register_forward_hook(lambda m, args, out: seen.__setitem__("output", out))
    try:
        with torch.no_grad(), BlockCapture(adapter, transformer, block_index=1) as capture:
            transformer(**inputs)
            student = capture.student(latents.shape)
    finally:
        pre.remove()
        post.remove()

    assert student.shape == (2, 3, 2, 3, 16)
    # token (t, h, w) of the grid is token t*hs*ws + h*ws + w of the sequence
    raw = seen["output"]
    for t, h, w in [(0, 0, 0), (1, 0, 2), (2, 1, 1), (2, 1, 2)]:
        torch.testing.assert_close(student[:, t, h, w], raw[:, t * 6 + h * 3 + w])
    torch.testing.assert_close(student.flatten(1, 3), raw)

    # the same reshape applied to the block-0 input reproduces the patch embedding's (t, h, w) layout
    with torch.no_grad():
        embedded = transformer.patch_embedding(latents).permute(0, 2, 3, 4, 1)  # (B, F, hs, ws, D)
        first = {}
        hook = adapter.blocks(transformer)[0].register_forward_pre_hook(
            lambda m, args: first.__setitem__("x", args[0])
        )
        transformer(**inputs)
        hook.remove()
    grid = adapter.token_grid(transformer, latents.shape)
    torch.testing.assert_close(adapter.tokens_to_grid(first["x"], grid), embedded)


def test_capture_leaves_output_unchanged_and_removes_hooks(wan):
    adapter, transformer = wan
    inputs = wan_inputs()
    with torch.no_grad():
        plain = transformer(**inputs)[0]
        with BlockCapture(adapter, transformer, block_index=0, teacher_block_index=2):
            hooked = transformer(**inputs)[0]
    torch.testing.assert_close(plain, hooked, rtol=0, atol=0)
    assert all(len(block._forward_hooks) == 0 for block in adapter.blocks(transformer))


def test_backbone_teacher_is_detached_and_student_keeps_graph(wan):
    adapter, transformer = wan
    inputs = wan_inputs(batch=1)
    with BlockCapture(adapter, transformer, block_index=0, teacher_block_index=2) as capture:
        transformer(**inputs)
        student = capture.student(inputs["hidden_states"].shape)
        teacher = capture.teacher(inputs["hidden_states"].shape)
    assert student.requires_grad and not teacher.requires_grad
    assert teacher.shape == student.shape
    assert not torch.equal(teacher, student)


@pytest.mark.parametrize("index", [3, -1, 10])
def test_block_index_out_of_range_fails_before_forward(wan, index):
    adapter, transformer = wan
    with pytest.raises(ValueError, match=r"crepa_block_index=.*valid indices are 0\.\.2"):
        BlockCapture(adapter, transformer, block_index=index)
    with pytest.raises(ValueError, match=r"crepa_teacher_block_index=.*0\.\.2"):
        BlockCapture(adapter, transformer, block_index=0, teacher_block_index=index)


def test_teacher_block_must_be_deeper(wan):
    adapter, transformer = wan
    with pytest.raises(ValueError, match="must be deeper"):
        BlockCapture(adapter, transformer, block_index=2, teacher_block_index=1)


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError, match="unsupported model family 'hunyuan'.*supported families: wan"):
        get_family("hunyuan")
