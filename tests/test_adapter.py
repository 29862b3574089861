"""Adapter verbs where families differ, on Wan: the flow shift its scheduler sets, the prediction it returns."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from crepa.families import Conditioning, get_family


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(shift=5.0),
                                       UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True,
                                                               prediction_type="flow_prediction")])
def test_flow_shift_is_read_from_the_scheduler_config(scheduler):
    # the Wan pipelines ship either scheduler: one names the shift `shift`, the other `flow_shift`
    assert get_family("wan").flow_shift(dict(scheduler.config), torch.Size((1, 4, 3, 4, 6))) == 5.0


def test_flow_shift_without_a_scheduler_config_is_the_family_default():
    adapter = get_family("wan")
    assert adapter.flow_shift({}, torch.Size((1, 4, 3, 4, 6))) == adapter.default_flow_shift


def test_wan_prediction_is_the_models_sample(wan):
    adapter, transformer = wan
    latents = torch.randn(2, 4, 3, 4, 6)
    kwargs = adapter.transformer_kwargs(transformer, latents, torch.tensor([500.0, 250.0]),
                                        Conditioning(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)))
    with torch.no_grad():
        ours = adapter.prediction(transformer(**kwargs), latents.shape)
        sample = transformer(**(kwargs | {"return_dict": True})).sample
    torch.testing.assert_close(ours, sample, rtol=0, atol=0)


def test_a_bare_tensor_output_keeps_the_whole_batch():
    output = torch.randn(2, 4, 3, 4, 6)
    assert get_family("wan").prediction(output, output.shape) is output


def test_a_prediction_of_another_shape_than_the_latents_fails():
    with pytest.raises(ValueError, match=r"prediction has shape \(4, 3, 4, 6\).*latents' \(2, 4, 3, 4, 6\)"):
        get_family("wan").prediction(torch.randn(4, 3, 4, 6), torch.Size((2, 4, 3, 4, 6)))
