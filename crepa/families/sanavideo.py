"""SANA-Video 480p text-to-video (SanaVideoTransformer3DModel, AutoencoderKLWan, Gemma 2).

The text is encoded as `SanaVideoPipeline.__call__` encodes a prompt by default: the caption lower-cased and
stripped (`clean_caption=False`: its cleaning needs bs4 and ftfy), the pipeline's default complex human instruction
prepended, Gemma 2 run with the attention mask over `instruction tokens + max_length - 2` right-padded tokens, then
token 0 and the last `max_length - 1` positions kept with their mask. The transformer attends to the text through
that mask only (no positional encoding on text tokens), so the cache holds the kept tokens the mask marks and the
trainer's zero padding and prefix mask give the transformer what the pipeline gives it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from crepa.families.base import Conditioning, FamilyAdapter, TextEncoders
from crepa.families.wan_latents import WanLatents


@functools.cache
def pipeline_instruction() -> str:
    """The complex human instruction `SanaVideoPipeline.__call__` prepends to every prompt by default, joined as it
    joins it."""
    from diffusers import SanaVideoPipeline

    return "\n".join(inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaVideoAdapter(WanLatents, FamilyAdapter):
    name = "sanavideo"
    transformer_class_name = "SanaVideoTransformer3DModel"
    block_list_attr = "transformer_blocks"
    text_encoder_classes = {"text_encoder": "Gemma2Model"}
    pipeline_class_name = "SanaVideoPipeline"
    default_text_max_length = 300
    default_flow_shift = 8.0
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_crepa_block = 10
    # ComfyUI has no native SANA-Video (nor Sana) model: comfy/model_base.py and comfy/lora.py know none
    comfyui_lora = False

    def text_settings(self) -> dict:
        return {"caption": "lower().strip()", "instruction": pipeline_instruction()}

    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        tokenizer, text_encoder = encoders["tokenizer"], encoders["text_encoder"]
        instruction = pipeline_instruction()
        padded = len(tokenizer.encode(instruction)) + max_length - 2
        tokens = tokenizer([instruction + caption.lower().strip() for caption in captions], padding="max_length",
                           max_length=padded, truncation=True, add_special_tokens=True, padding_side="right",
                           return_tensors="pt")
        device = next(text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        # token 0 and the last max_length - 1 positions. With right padding the mask is a prefix and the kept
        # positions are 0 and a contiguous range, so the kept mask is a prefix too: its length is all it holds
        keep = [0, *range(padded - max_length + 1, padded)]
        lengths = mask[:, keep].gt(0).sum(dim=1)
        return [{"embeds": h[:n]} for h, n in zip(hidden[:, keep], lengths.tolist(), strict=True)]

    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        # timesteps on the scheduler's 0..1000 scale, unscaled, and no guidance embedding: as the pipeline calls it
        return dict(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=conditioning.text,
                    encoder_attention_mask=conditioning.text_mask, return_dict=False)

    def text_embedding_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.caption_channels

    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        return {}

    def tiny_transformer_config(self) -> dict:
        return dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                    caption_channels=16, mlp_ratio=2.0, patch_size=(1, 2, 2), rope_max_seq_len=32)

    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        from transformers import Gemma2Config

        return Gemma2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                            eos_token_id=1, bos_token_id=2)

    def tiny_text_components(self) -> dict[str, Any]:
        from crepa.tiny_models import tiny_gemma_tokenizer

        tokenizer = tiny_gemma_tokenizer(pipeline_instruction())
        encoder = self.text_encoder_class()(self.tiny_text_encoder_config(len(tokenizer))).eval()
        return {"tokenizer": tokenizer, "text_encoder": encoder}

    def tiny_scheduler(self) -> Any:
        # what the SANA-Video checkpoints ship (diffusers' convert_sana_video_to_diffusers.py, flow-dpm_solver)
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(flow_shift=self.default_flow_shift, use_flow_sigmas=True,
                                           prediction_type="flow_prediction")
