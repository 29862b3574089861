"""Wan 2.1 / 2.2 (WanTransformer3DModel, AutoencoderKLWan, UMT5): text-to-video, and image-to-video from a first frame.

Image-to-video transformers (WanImageToVideoPipeline) take 2 * z_dim + t_c input channels: the noisy latents, then
the pipeline's condition (a t_c-channel mask of the given frame and the VAE latents of the first frame followed by
zeros); Wan 2.1 I2V also takes CLIP embeddings of the frame (`image_dim`). Which one a model is, is read from its
transformer and VAE configs. Wan 2.2 TI2V-5B generating from text is a text-to-video model with a 48-channel,
16x spatial VAE, read from the same configs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crepa.errors import UserError
from crepa.families.base import (
    Conditioning,
    FamilyAdapter,
    ImageConditioning,
    ImageEncoders,
    TextEncoders,
    comfyui_names,
)
from crepa.families.wan_latents import WanLatents

# diffusers module (a full-name pattern) -> the module of ComfyUI's native Wan model (comfy/ldm/wan/model.py).
# These are all the layers a LoRA can wrap: the Conv3d patch embedding and every Linear. Norms and the
# modulation tables (scale_shift_table, native `modulation`) are no LoRA targets.
_COMFYUI_MODULES = (
    (r"patch_embedding", r"patch_embedding"),
    (r"condition_embedder\.text_embedder\.linear_1", r"text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", r"text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", r"time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", r"time_embedding.2"),
    (r"condition_embedder\.time_proj", r"time_projection.1"),
    (r"blocks\.(\d+)\.attn1\.to_q", r"blocks.\1.self_attn.q"),
    (r"blocks\.(\d+)\.attn1\.to_k", r"blocks.\1.self_attn.k"),
    (r"blocks\.(\d+)\.attn1\.to_v", r"blocks.\1.self_attn.v"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_q", r"blocks.\1.cross_attn.q"),
    (r"blocks\.(\d+)\.attn2\.to_k", r"blocks.\1.cross_attn.k"),
    (r"blocks\.(\d+)\.attn2\.to_v", r"blocks.\1.cross_attn.v"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"proj_out", r"head.head"),
)
# Image-to-video only: ComfyUI builds these when the weights hold an image embedder (`img_emb`), so a model
# with image keys/values but no image embedder loads there as text-to-video, without k_img / v_img.
_COMFYUI_IMAGE_MODULES = (
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", r"img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", r"img_emb.proj.3"),
    (r"blocks\.(\d+)\.attn2\.add_k_proj", r"blocks.\1.cross_attn.k_img"),
    (r"blocks\.(\d+)\.attn2\.add_v_proj", r"blocks.\1.cross_attn.v_img"),
)


class WanAdapter(WanLatents, FamilyAdapter):
    name = "wan"
    transformer_class_name = "WanTransformer3DModel"
    block_list_attr = "blocks"
    text_encoder_classes = {"text_encoder": "UMT5EncoderModel"}
    pipeline_class_name = "WanPipeline"
    image_encoder_class_name = "CLIPVisionModel"
    default_text_max_length = 512
    default_flow_shift = 3.0
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_crepa_block = 8

    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        text_encoder = encoders["text_encoder"]
        tokens = encoders["tokenizer"](
            [prompt_clean(c) for c in captions], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = next(text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        return [{"embeds": h[:n]} for h, n in zip(hidden, lengths.tolist(), strict=True)]

    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        # Wan attends to the zero-padded text tokens without a mask, exactly as its pipeline does.
        hidden = noisy_latents
        if conditioning.condition is not None:  # image-to-video: (B, C + C_c, F, H, W) as WanImageToVideoPipeline
            hidden = torch.cat([noisy_latents, conditioning.condition.to(noisy_latents.dtype)], dim=1)
        kwargs = dict(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=conditioning.text,
                      return_dict=False)
        if conditioning.image_embeds is not None:
            kwargs["encoder_hidden_states_image"] = conditioning.image_embeds
        return kwargs

    def image_conditioning(self, transformer_config: dict, vae_config: dict) -> ImageConditioning | None:
        latent_channels = vae_config["z_dim"]
        extra = transformer_config["in_channels"] - latent_channels
        temporal, _ = self.vae_compression(vae_config)
        if extra not in (0, latent_channels + temporal):
            raise UserError(
                f"the wan transformer takes {transformer_config['in_channels']} input channels, but with this VAE "
                f"(z_dim {latent_channels}, temporal compression {temporal}) a text-to-video model takes "
                f"{latent_channels} and an image-to-video model {2 * latent_channels + temporal}",
                fix="use the VAE of the transformer's own pipeline")
        takes_images = transformer_config.get("image_dim") is not None
        return ImageConditioning(extra, takes_images) if extra or takes_images else None

    def encode_condition(self, vae: nn.Module, image_encoders: ImageEncoders | None, frames: torch.Tensor,
                         conditioning: ImageConditioning) -> dict[str, torch.Tensor]:
        """WanImageToVideoPipeline.prepare_latents' condition and encode_image's embeddings, from the first frame."""
        arrays = {}
        if conditioning.condition_channels:
            count, height, width, _ = frames.shape
            first = frames[:1].permute(3, 0, 1, 2).unsqueeze(0).float().div_(127.5).sub_(1.0)  # (1, 3, 1, H, W)
            video = torch.cat([first, first.new_zeros(1, 3, count - 1, height, width)], dim=2)
            latents = self.encode_video(vae, video)  # (1, C, f, h, w): the argmax latents, normalised
            temporal, _ = self.vae_compression(vae.config)
            mask = torch.zeros(1, temporal, *latents.shape[2:], device=latents.device, dtype=latents.dtype)
            mask[:, :, 0] = 1.0  # the first latent frame's t_c pixel frames are all the given frame
            arrays["condition"] = torch.cat([mask, latents], dim=1)[0]
        if conditioning.image_embeds:
            from PIL import Image

            encoder = image_encoders["image_encoder"]
            image = Image.fromarray(frames[0].cpu().numpy())
            pixels = image_encoders["image_processor"](images=image, return_tensors="pt")["pixel_values"]
            hidden = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True)
            arrays["image_embeds"] = hidden.hidden_states[-2][0]  # the penultimate layer, as the pipeline takes
        return arrays

    def image_embedding_dim(self, transformer: nn.Module) -> int | None:
        return self.unwrap(transformer).config.image_dim

    def text_embedding_dim(self, transformer: nn.Module) -> int:
        return self.unwrap(transformer).config.text_dim

    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        model = self.unwrap(transformer)
        return comfyui_names(model, _COMFYUI_MODULES + (_COMFYUI_IMAGE_MODULES if model.config.image_dim else ()))

    def tiny_transformer_config(self) -> dict:
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
        )

    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        from transformers import UMT5Config

        return UMT5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
