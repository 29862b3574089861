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
    temporal, spatial = adapter.vae_compression(adapter.tiny_vae().config)  # the config with the class's defaults
    multiple = spatial * spatial_patch(adapter.tiny_transformer_config())
    return 1 + (latent_frames - 1) * temporal, columns * multiple, rows * multiple


def _word_merges(pieces: list[str], suffix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges under which each piece (in byte-level characters) is one token.

    Every byte is in the vocabulary (with `suffix` too, CLIP's end-of-word mark), so any text tokenizes.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = sorted(set(bytes_to_unicode().values()))
    vocab = {token: index for index, token in enumerate(characters + [c + suffix for c in characters if suffix])}
    merges = []
    for piece in pieces:
        symbols = list(piece[:-1]) + [piece[-1] + suffix]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((symbols[0], symbols[1]))
            symbols = [merged] + symbols[2:]
    return vocab, merges


def tiny_qwen_tokenizer(template: str, prefix_tokens: int = 128):
    """A Qwen2 byte-level BPE tokenizer whose words are single tokens, with Qwen's chat special tokens.

    `template` is a chat prompt template with `{}` where the caption goes; the text before it comes out as exactly
    `prefix_tokens` tokens (one of its words is split in two when that makes the count), as the Kandinsky 5
    pipeline's cut of `prompt_template_encode_start_idx` tokens expects of the real tokenizer.
    """
    import regex
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    to_unicode = bytes_to_unicode()

    def pieces(text: str) -> list[str]:
        chunks = regex.split("|".join(map(regex.escape, specials)), text)
        return ["".join(to_unicode[b] for b in piece.encode()) for chunk in chunks
                for piece in regex.findall(PRETOKENIZE_REGEX, chunk)]

    prefix = template.split("{}")[0]
    words = list(dict.fromkeys(pieces(template) + pieces(" ".join(TINY_WORDS)) + TINY_WORDS))

    def build(split: str | None):
        kept = [w for w in words if w != split] + ([split[: len(split) // 2], split[len(split) // 2:]] if split else [])
        vocab, merges = _word_merges(kept)
        vocab |= {token: len(vocab) + i for i, token in enumerate(specials)}
        return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=specials[1:],
                              model_max_length=32768)

    for split in [None, *sorted(set(pieces(prefix)), key=lambda p: (-len(p), p))]:
        tokenizer = build(split)
        if len(tokenizer(prefix).input_ids) == prefix_tokens:
            return tokenizer
    raise ValueError(f"no tiny tokenizer makes the template's prefix {prefix_tokens} tokens long")


def tiny_clip_tokenizer():
    """A CLIP tokenizer whose words are single tokens, start and end of text last in the vocabulary like CLIP's."""
    from transformers import CLIPTokenizer

    vocab, merges = _word_merges(TINY_WORDS, suffix="</w>")
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tiny_pipeline(adapter: FamilyAdapter, folder: str, seed: int = 0) -> str:
    """Write a complete diffusers pipeline folder (transformer, vae, text encoders, tokenizers, scheduler)."""
    import diffusers

    torch.manual_seed(seed)
    text = adapter.tiny_text_components()
    vae = adapter.tiny_vae()
    transformer = adapter.tiny_transformer()
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
