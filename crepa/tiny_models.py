"""Tiny random-weight models saved with `save_pretrained`, for the demo and the tests.

They go through exactly the loading code real checkpoints use; only their size differs.
"""

from __future__ import annotations

import os

import torch

from crepa.families.base import FamilyAdapter, spatial_patch

TINY_WORDS = (
    "a the of and in on with red green blue yellow white black circle square shape shapes moving moves "
    "slowly quickly across left right up down over background dark light bright small large video clip "
    "camera scene ball box two three one bouncing sliding rotating colour colored"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer with T5's conventions (pad 0, eos 1, unk 2, eos appended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_gemma_tokenizer(extra_text: str = ""):
    """A Gemma tokenizer (BPE with byte fallback, spaces as "▁", <bos> prepended) on a tiny vocabulary.

    Every printable ASCII character is a token, and the words of TINY_WORDS and `extra_text` merge into whole-word
    tokens ("▁red"); anything else falls back to byte tokens, so every caption tokenizes.
    """
    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in ["▁", "\n", *map(chr, range(33, 127)), *(f"<0x{byte:02X}>" for byte in range(256))]:
        vocab.setdefault(piece, len(vocab))
    merges: dict[tuple[str, str], None] = {}  # insertion-ordered set: a merge's rank is its position
    words = [*TINY_WORDS, *extra_text.split()]
    # "▁word" merges rank first, so a word after a space becomes one token, not "▁" + the bare word's pieces
    for piece in [*("▁" + word for word in words), *words]:
        for end in range(2, len(piece) + 1):
            merges.setdefault((piece[: end - 1], piece[end - 1]), None)
            vocab.setdefault(piece[:end], len(vocab))
    return GemmaTokenizerFast(vocab=vocab, merges=list(merges), add_bos_token=True, model_max_length=8192)


def tiny_clip_size(adapter: FamilyAdapter, latent_frames: int = 3, rows: int = 3,
                   columns: int = 4) -> tuple[int, int, int]:
    """(frames, width, height) of clips for the family's tiny models whose token grid is latent_frames x rows x
    columns: the family's own frame and side rules (t_c*k+1 frames, sides a multiple of compression x patch)."""
    temporal, spatial = adapter.vae_compression(adapter.tiny_vae_config())
    multiple = spatial * spatial_patch(adapter.tiny_transformer_config())
    return 1 + (latent_frames - 1) * temporal, columns * multiple, rows * multiple


def save_tiny_pipeline(adapter: FamilyAdapter, folder: str, seed: int = 0) -> str:
    """Write a complete diffusers pipeline folder (transformer, vae, text encoders, tokenizers, scheduler)."""
    import diffusers

    torch.manual_seed(seed)
    text = adapter.tiny_text_components()
    vae = adapter.tiny_vae()
    transformer = adapter.transformer_class()(**adapter.tiny_transformer_config()).eval()
    pipeline = getattr(diffusers, adapter.pipeline_class_name)(
        vae=vae, scheduler=adapter.tiny_scheduler(), transformer=transformer, **text
    )
    pipeline.save_pretrained(folder)
    return folder


def save_tiny_dinov2(folder: str, registers: int = 0, seed: int = 0) -> str:
    """Write a two-layer DINOv2 (optionally with register tokens) with the real patch size 14."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
                  image_size=56)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    os.makedirs(folder, exist_ok=True)
    model.eval().save_pretrained(folder)
    return folder
