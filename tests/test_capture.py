"""Block capture on a tiny random WanTransformer3DModel."""

import pytest
import torch

from crepa.capture import BlockCapture
from crepa.families import get_family


def wan_inputs(batch=2, frames=3, height=4, width=6):
    torch.manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 5, 16),
        return_dict=False,
    )


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
