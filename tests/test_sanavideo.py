"""SANA-Video's text against `SanaVideoPipeline.encode_prompt` with its `__call__` defaults, where the shared
conformance suite's one short caption does not reach: truncation, an empty caption, another max length; and the
instruction's place in the text set's identity."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import SanaVideoPipeline

from crepa.cache.keys import fingerprint
from crepa.families import get_family
from crepa.families.sanavideo import SanaVideoAdapter, pipeline_instruction
from precompute.config import PrecomputeConfig
from precompute.feature_sets import text_identity


@pytest.fixture(scope="module")
def pipe(tiny_pipelines) -> SanaVideoPipeline:
    return SanaVideoPipeline.from_pretrained(tiny_pipelines("sanavideo"))


def call_default(name: str):
    return inspect.signature(SanaVideoPipeline.__call__).parameters[name].default


@pytest.mark.parametrize(("caption", "max_length"), [
    ("  Two BLUE squares slide left ", 300),
    ("", 300),  # an unconditional clip: the pipeline still encodes the instruction
    (" ".join(["a red circle moves over a dark background"] * 60), 300),  # longer than 300 tokens: truncated
    ("a small white box rotating slowly across the scene", 5),
])
def test_cached_text_is_what_the_pipeline_feeds_the_transformer(pipe, caption, max_length):
    adapter = get_family("sanavideo")
    with torch.no_grad():
        (ours,) = adapter.encode_text({"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}, [caption],
                                      max_length)
        embeds, mask, _, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, clean_caption=call_default("clean_caption"),
            max_sequence_length=max_length, complex_human_instruction=call_default("complex_human_instruction"))
    length = len(ours["embeds"])
    assert mask.shape == (1, max_length)
    assert mask[0, :length].all() and not mask[0, length:].any()  # the pipeline's mask is the prefix we keep
    torch.testing.assert_close(ours["embeds"], embeds[0, :length], rtol=0, atol=0)


def test_the_text_set_identity_covers_the_instruction(tiny_pipelines, tmp_path):
    class OtherInstruction(SanaVideoAdapter):
        def text_settings(self) -> dict:
            return super().text_settings() | {"instruction": "Describe the video:"}

    config = PrecomputeConfig(dataset_config=str(tmp_path / "d.toml"), family="sanavideo", out=str(tmp_path / "c"),
                              model=tiny_pipelines("sanavideo"))
    identity = text_identity(get_family("sanavideo"), config, "float32", 300)
    assert identity["text_settings"]["instruction"] == "\n".join(call_default("complex_human_instruction"))
    assert identity["text_settings"]["instruction"] == pipeline_instruction()
    assert fingerprint(text_identity(OtherInstruction(), config, "float32", 300)) != fingerprint(identity)
