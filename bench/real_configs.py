"""The real architectures' configs (random weights): Wan 2.1 T2V 1.3B and 14B, the Wan 2.1 VAE, LTX-Video 0.9 2B
and its VAE, SANA-Video 2B, Kandinsky 5 T2V Lite and Pro with the HunyuanVideo VAE, DINOv2, UMT5-XXL.

Timing does not depend on weight values, so these stand in for the released checkpoints.
`layers` scales depth down for machines that cannot hold or run the full models; widths,
heads and patch sizes always stay the real ones.
"""

from __future__ import annotations

import os

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
"""diffusers' transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers."""

WAN_14B = WAN_1_3B | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
"""Wan-AI/Wan2.1-T2V-14B-Diffusers: 40 blocks of 40 heads x 128 (5120 wide), ffn 13824; the rest as 1.3B."""

SANA_VIDEO_2B = dict(
    in_channels=16, out_channels=16, num_attention_heads=20, attention_head_dim=112, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=3.0, attention_bias=False, sample_size=30, patch_size=(1, 2, 2), norm_elementwise_affine=False,
    norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
)
"""Efficient-Large-Model/SANA-Video_2B_480p_diffusers as diffusers' convert_sana_video_to_diffusers.py builds it:
20 blocks of 20 heads x 112 (2240 wide), linear self-attention, mlp_ratio 3.0 (the class default is 2.5), captions
from Gemma 2 2B (2304 wide); Wan 2.1 VAE latents."""

LTX_VIDEO_2B = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
    cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, attention_bias=True, attention_out_bias=True,
)
"""diffusers' transformer/config.json of Lightricks/LTX-Video (0.9.0, 2B): 28 blocks of 32 heads x 64, 128 latent
channels in and out, T5-XXL captions (4096) projected to 2048; also LTXVideoTransformer3DModel's defaults."""

KANDINSKY5_T2V_LITE = dict(
    in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512, patch_size=(1, 2, 2),
    model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24), visual_cond=True,
)
"""kandinskylab Kandinsky 5.0 T2V Lite 5s (the dit_params of its configs/config_5s_sft.yaml; diffusers' defaults are
another size): 32 visual blocks 1792 wide (28 heads x 64), feed-forward 7168, 2 text blocks, on the 16-channel
latents of the HunyuanVideo VAE (4x temporal, 8x spatial) with a conditioning copy and mask (visual_cond: 33 input
channels); Qwen2.5-VL text (3584 wide, up to 256 tokens) and a CLIP-L pooled vector (768). The 10 s checkpoints
add sparse (nabla) attention, P 0.9, wT 11, wH 3, wW 3."""

DINOV2 = {
    "dinov2_vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2_vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
"""facebook/dinov2-{small,base,large,giant}: patch 14, mlp_ratio 4, trained at 518 px."""

UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, vocab_size=256384)
"""The encoder of google/umt5-xxl, Wan's text encoder."""


def wan_transformer(layers: int | None = None, dtype: torch.dtype = torch.float32, config: dict = WAN_1_3B):
    from diffusers import WanTransformer3DModel

    config = config | ({"num_layers": layers} if layers else {})
    model = WanTransformer3DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype)


def sanavideo_transformer(layers: int | None = None, dtype: torch.dtype = torch.float32,
                          config: dict = SANA_VIDEO_2B):
    from diffusers import SanaVideoTransformer3DModel

    config = config | ({"num_layers": layers} if layers else {})
    model = SanaVideoTransformer3DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype)


def wan_vae(dtype: torch.dtype = torch.float32):
    """AutoencoderKLWan's defaults are the Wan 2.1 VAE (base 96, z 16, mults 1-2-4-4, latent mean/std)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan().to(dtype).eval().requires_grad_(False)


def ltx_transformer(layers: int | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(**(LTX_VIDEO_2B | ({"num_layers": layers} if layers else {})))
    return model if dtype == torch.float32 else model.to(dtype)


def ltx_vae(dtype: torch.dtype = torch.float32):
    """AutoencoderKLLTXVideo's defaults are the LTX-Video 0.9.0 VAE (128 latent channels, 32x spatial, 8x temporal)."""
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo().to(dtype).eval().requires_grad_(False)


def dinov2(name: str = "dinov2_vitg14", layers: int | None = None):
    from transformers import Dinov2Config, Dinov2Model

    config = DINOV2[name] | ({"num_hidden_layers": layers} if layers else {})
    return Dinov2Model(Dinov2Config(patch_size=14, image_size=518, mlp_ratio=4, **config)).eval()


def save_dinov2(folder: str, name: str = "dinov2_vitg14", layers: int | None = None) -> str:
    """Write a random-weight DINOv2 with save_pretrained, so it loads through the product's own loader."""
    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    dinov2(name, layers).save_pretrained(folder)
    return folder


def umt5_encoder(layers: int | None = None, vocab_size: int | None = None):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5_XXL | ({"num_layers": layers} if layers else {}) | ({"vocab_size": vocab_size} if vocab_size else {})
    return UMT5EncoderModel(UMT5Config(**config)).eval()


KANDINSKY5_T2V_PRO = KANDINSKY5_T2V_LITE | dict(time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=4,
                                                num_visual_blocks=60, axes_dims=(32, 48, 48))
"""Kandinsky 5.0 T2V Pro (19B): 60 visual blocks of 32 heads x 128 (4096 wide), ff 16384, 4 text blocks."""


def kandinsky5_transformer(layers: int | None = None, dtype: torch.dtype = torch.float32,
                           config: dict = KANDINSKY5_T2V_LITE):
    """`layers` cuts the visual blocks (CREPA's); the text blocks stay."""
    from diffusers import Kandinsky5Transformer3DModel

    config = config | ({"num_visual_blocks": layers} if layers else {})
    model = Kandinsky5Transformer3DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype)


def hunyuan_vae(dtype: torch.dtype = torch.float32):
    """AutoencoderKLHunyuanVideo's defaults are the HunyuanVideo VAE Kandinsky 5 uses (16 latent channels, 4x / 8x)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo().to(dtype).eval().requires_grad_(False)
