"""The one interface every model family implements.

The trainer and precompute never test for a family by name: every family-specific fact
(block list, token layout, VAE normalisation, text encoding, flow-matching conventions)
lives behind these verbs, one module per family.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from crepa.errors import UserError

TextEncoders = dict[str, Any]
"""The family's tokenizers and text encoders by pipeline subfolder: {"tokenizer": ..., "text_encoder": ..., ...}."""
ImageEncoders = dict[str, Any]
"""The pipeline's image encoder and its processor by subfolder: {"image_encoder": ..., "image_processor": ...}."""


@dataclass(frozen=True)
class ImageConditioning:
    """What an image-to-video transformer takes besides the noisy latents and the text, read from its configs."""

    condition_channels: int
    """Channels of the latent condition its pipeline concatenates to the noisy latents (0: none)."""
    image_embeds: bool
    """Whether it also takes image-encoder embeddings of the first frame (from the pipeline's image_encoder)."""


@dataclass
class Conditioning:
    """Everything besides the noisy latents that one denoiser forward takes, for a batch of B clips.

    Built from cached arrays only; `transformer_kwargs` turns it into the family's keyword arguments.
    """

    text: torch.Tensor
    """(B, L, D) the cached text embeddings, zero-padded to the cached max length."""
    text_mask: torch.Tensor
    """(B, L) bool, True on each caption's own tokens (a prefix of each row)."""
    text_pooled: torch.Tensor | None = None
    """(B, P) pooled vector of a second text encoder, for families whose cache stores one."""
    fps: torch.Tensor | None = None
    """(B,) frame rate of each clip's sampled frames; NaN where the cache did not record it."""
    condition: torch.Tensor | None = None
    """(B, C_c, F, H, W) first-frame conditioning that an image-to-video pipeline concatenates to the noisy latents
    along channels, as that pipeline builds it (Wan I2V: a mask of the given frame, then the VAE latents of the
    first frame followed by zeros)."""
    image_embeds: torch.Tensor | None = None
    """(B, N, D_img) image-encoder embeddings of the first frame, for transformers that take them (Wan 2.1 I2V)."""
    vae_compression: tuple[int, int] | None = None
    """(temporal, spatial) compression of the pipeline's VAE, for families whose transformer scales positions by it."""

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device,
                   vae_compression: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of a collated batch (train.data.collate), on `device`."""
        arrays = {f.name: batch[f.name].to(device) for f in fields(cls) if isinstance(batch.get(f.name), torch.Tensor)}
        return cls(**arrays, vae_compression=vae_compression)

    def select(self, rows: slice, tokens: int | None = None) -> Conditioning:
        """The conditioning of the clips in `rows`, their text cut to its first `tokens` tokens when given."""
        picked = {f.name: value[rows] if isinstance(value := getattr(self, f.name), torch.Tensor) else value
                  for f in fields(self)}
        if tokens is not None:
            picked["text"], picked["text_mask"] = picked["text"][:, :tokens], picked["text_mask"][:, :tokens]
        return Conditioning(**picked)


def comfyui_names(model: nn.Module, table: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """`diffusion_model.<name>` ComfyUI gives each module of `model` whose full name matches a (pattern, replacement)
    row of `table`: the families' `comfyui_modules` differ only in their tables."""
    names = {}
    for name, _ in model.named_modules():
        for ours, theirs in table:
            match = re.fullmatch(ours, name)
            if match:
                names[name] = "diffusion_model." + match.expand(theirs)
    return names


def spatial_patch(transformer_config: dict) -> int:
    """The DiT's spatial patch from its config's `patch_size`: an int, or one per axis with the width last."""
    patch = transformer_config.get("patch_size") or 1
    return int(patch[-1] if isinstance(patch, list | tuple) else patch)


class FamilyAdapter(ABC):
    """Model-family facts and verbs shared by precompute and train."""

    name: str
    """Short name used on the command line and stored in the cache."""
    transformer_class_name: str
    """diffusers class of the denoiser."""
    block_list_attr: str
    """Attribute of the transformer that holds its `nn.ModuleList` of blocks."""
    vae_class_name: str
    """diffusers class of the VAE."""
    text_encoder_classes: dict[str, str]
    """transformers class of each text encoder, by pipeline subfolder (`text_encoder`, `text_encoder_2`); each
    one's tokenizer is in the matching `tokenizer`, `tokenizer_2` subfolder."""
    pipeline_class_name: str
    """diffusers pipeline whose `save_lora_weights` / `load_lora_weights` format LoRAs follow."""
    default_text_max_length: int
    """Tokenizer max length the family's pipeline uses."""
    default_flow_shift: float
    """Timestep shift of the family's flow-matching scheduler, for pipelines that have no scheduler config (families
    whose scheduler shifts otherwise override `default_scheduler_config`)."""
    default_lora_targets: tuple[str, ...]
    """Module-name suffixes that LoRA wraps by default (dotted suffixes such as `self_attention.out_layer` work)."""
    comfyui_lora: bool = True
    """Whether ComfyUI has a native model of this family that loads LoRAs under `comfyui_modules`' names; when it
    has none, --comfyui-export is refused."""
    default_crepa_block: int
    """The block CREPA aligns unless `crepa_block_index` says otherwise."""
    latents_normalisation: str = "(z - latents_mean) / latents_std, as the diffusers pipeline"
    """How `encode_video` normalises the VAE's latents, as the cache describes them."""
    text_padding: bool = True
    """Whether the denoiser may get text zero-padded to the cached max length (the family's pipeline pads too, or
    masks the padding). False for a transformer that takes no text mask and whose pipeline does not pad: the trainer
    then runs each caption length as its own forward, with the text cut to that length (no padding at all)."""

    def transformer_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    @staticmethod
    def unwrap(transformer: nn.Module) -> nn.Module:
        """The diffusers model inside a DDP or torch.compile wrapper."""
        module = getattr(transformer, "module", transformer)
        return getattr(module, "_orig_mod", module)

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        """The transformer's block list."""
        return getattr(self.unwrap(transformer), self.block_list_attr)

    def check_block_index(self, transformer: nn.Module, index: int, option: str) -> None:
        """Fail before any forward when `index` names no block."""
        count = len(self.blocks(transformer))
        if not 0 <= index < count:
            raise UserError(
                f"{option}={index} is out of range: the {self.name} transformer has {count} blocks, "
                f"valid indices are 0..{count - 1}"
            )

    def latent_channels(self, transformer: nn.Module) -> int:
        """Channels of the latents the transformer denoises."""
        return self.unwrap(transformer).config.in_channels

    def attention_backend(self, transformer: nn.Module) -> str | None:
        """The diffusers attention backend the transformer's config needs (`set_attention_backend`), None for the
        default one."""
        return None

    def set_attention_backend(self, transformer: nn.Module) -> None:
        """Give this transformer's attention the backend its config needs, leaving other models' alone.

        diffusers' `set_attention_backend` also changes the process-wide default; the context restores it.
        """
        from diffusers.models.attention_dispatch import attention_backend

        backend = self.attention_backend(transformer)
        if backend:
            with attention_backend(backend):
                self.unwrap(transformer).set_attention_backend(backend)

    def token_multiple(self, transformer_config: dict) -> int:
        """What the token grid's sides must be a multiple of for the transformer's attention (1: anything)."""
        return 1

    def vae_class(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def text_encoder_class(self, subfolder: str = "text_encoder") -> type[nn.Module]:
        """transformers class of the text encoder stored under `subfolder`."""
        import transformers

        return getattr(transformers, self.text_encoder_classes[subfolder])

    @staticmethod
    def tokenizer_subfolder(text_encoder_subfolder: str) -> str:
        """The pipeline subfolder of a text encoder's tokenizer: text_encoder_2 -> tokenizer_2."""
        return text_encoder_subfolder.replace("text_encoder", "tokenizer")

    @abstractmethod
    def vae_compression(self, vae_config: dict) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE, read from its config."""

    def latent_frames(self, pixel_frames: int, vae_config: dict) -> int:
        """Latent frames for a clip of `pixel_frames` (causal VAEs: 1 + (n - 1) / t_c)."""
        temporal, _ = self.vae_compression(vae_config)
        return 1 + (pixel_frames - 1) // temporal

    @abstractmethod
    def encode_video(self, vae: nn.Module, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, f, h, w), as the pipeline expects them."""

    @abstractmethod
    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, f, h, w) -> pixels (B, 3, F, H, W) in [-1, 1]."""

    @abstractmethod
    def encode_text(self, encoders: TextEncoders, captions: list[str],
                    max_length: int) -> list[dict[str, torch.Tensor]]:
        """Captions -> per caption the text arrays the transformer takes, as the family's pipeline computes them.

        Each dict holds `embeds` (L_i, D): the caption's own tokens, which the trainer zero-pads to `max_length` and
        marks with a prefix mask (families whose pipeline encodes with padding compute with it, then keep the
        caption's tokens); and `pooled` (P,) where the family takes a pooled vector.
        """

    def text_settings(self) -> dict:
        """What the family's pipeline does to a caption before tokenizing it that the text encoder files do not
        record (an instruction prepended, case folding): part of the text set's identity, so a change recomputes
        the text. {} when there is nothing beyond the tokenizer."""
        return {}

    @abstractmethod
    def transformer_kwargs(self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                           conditioning: Conditioning) -> dict:
        """Keyword arguments of one forward of `transformer`, as the family's pipeline builds them from its config.

        noisy_latents (B, C, F, H, W); timesteps (B,) on the scheduler's 0..1000 scale. `hidden_states` in the
        result is also the layout the family's pipeline takes as `latents=`.
        """

    image_encoder_class_name: str | None = None
    """transformers class of the pipeline's `image_encoder` (processor in `image_processor`), for families whose
    image-to-video transformers take image embeddings."""

    def image_conditioning(self, transformer_config: dict, vae_config: dict) -> ImageConditioning | None:
        """How the transformer of `transformer_config` is conditioned on a clip's first frame; None when it is not
        (text-to-video). Families with image-to-video pipelines override this and `encode_condition`."""
        return None

    def encode_condition(self, vae: nn.Module, image_encoders: ImageEncoders | None, frames: torch.Tensor,
                         conditioning: ImageConditioning) -> dict[str, torch.Tensor]:
        """(F, H, W, 3) uint8 frames of a clip -> its first-frame conditioning, as the family's image-to-video
        pipeline builds it from that frame: `condition` (C_c, f, h, w) and/or `image_embeds` (N, D_img)."""
        raise NotImplementedError(f"the {self.name} family has no image-to-video conditioning")

    def image_embedding_dim(self, transformer: nn.Module) -> int | None:
        """Width of the image embeddings the transformer takes; None when it takes none."""
        return None

    def prediction(self, output: Any, latent_shape: torch.Size) -> torch.Tensor:
        """The denoiser's forward output -> its (B, C, F, H, W) prediction for latents of `latent_shape`.

        A `return_dict=False` tuple gives its first item; a bare tensor is the prediction itself (its first index
        is the batch). Families whose denoiser returns another layout (packed, channels-last) override this.
        """
        sample = output[0] if isinstance(output, tuple) else output
        if sample.shape != latent_shape:
            raise ValueError(f"{self.name}: the transformer's prediction has shape {tuple(sample.shape)}, "
                             f"expected the latents' {tuple(latent_shape)}")
        return sample

    def default_scheduler_config(self) -> dict:
        """The scheduler config of the family's pipelines, for a pipeline folder that has none: a static shift."""
        return {"shift": self.default_flow_shift}

    def flow_shift(self, scheduler_config: dict, latent_shape: torch.Size) -> float:
        """Sigma shift for latents of `latent_shape` (B, C, F, H, W), from the pipeline's scheduler config.

        A static shift, named `shift` (FlowMatchEulerDiscreteScheduler) or `flow_shift` (UniPC, DPM-Solver);
        `default_scheduler_config()`'s when the pipeline has no scheduler config ({}). Families whose scheduler
        shifts with the token count override this.
        """
        scheduler_config = scheduler_config or self.default_scheduler_config()
        for key in ("shift", "flow_shift"):
            if key in scheduler_config:
                return float(scheduler_config[key])
        raise UserError(f"the {self.name} pipeline's scheduler ({scheduler_config.get('_class_name')}) "
                        "sets no flow shift (`shift` or `flow_shift`)", where="scheduler/scheduler_config.json",
                        fix="pass --flow-shift")

    def flow_terminal(self, scheduler_config: dict) -> float:
        """Sigma that the shifted schedule is stretched to end at (FlowMatchEulerDiscreteScheduler's
        `shift_terminal`); 0 for none.

        The scheduler stretches its N inference sigmas affinely so the last one lands there; the stretch of the
        continuous schedule (N to infinity) maps sigma in (0, 1) to terminal + (1 - terminal) * sigma.
        """
        scheduler_config = scheduler_config or self.default_scheduler_config()
        return float(scheduler_config.get("shift_terminal") or 0.0)

    @abstractmethod
    def text_embedding_dim(self, transformer: nn.Module) -> int:
        """Width of the text embeddings the transformer takes."""

    def pooled_embedding_dim(self, transformer: nn.Module) -> int | None:
        """Width of the pooled text vector the transformer takes (`text_pooled`); None when it takes none."""
        return None

    @abstractmethod
    def comfyui_modules(self, transformer: nn.Module) -> dict[str, str]:
        """ComfyUI's LoRA name of every module of `transformer` that ComfyUI's loader patches.

        Maps diffusers module names (blocks.0.attn1.to_q) to the names ComfyUI reads
        (diffusion_model.blocks.0.self_attn.q). ComfyUI skips LoRA layers under any other name with
        only a log line, so a module left out here must not be exported.
        """

    @abstractmethod
    def tiny_vae_config(self) -> dict:
        """Constructor kwargs of a tiny VAE matching `tiny_transformer_config`."""

    @abstractmethod
    def tiny_text_encoder_config(self, vocab_size: int) -> Any:
        """A transformers config of a tiny text encoder whose width matches the tiny transformer."""

    def tiny_vae(self) -> nn.Module:
        """A tiny VAE from `tiny_vae_config` (families whose VAE keeps statistics in buffers set them here)."""
        return self.vae_class()(**self.tiny_vae_config()).eval()

    def tiny_text_components(self) -> dict[str, Any]:
        """The tiny pipeline's tokenizers and text encoders by subfolder (one pair unless the family has more)."""
        from crepa.tiny_models import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        encoder = self.text_encoder_class()(self.tiny_text_encoder_config(len(tokenizer))).eval()
        return {"tokenizer": tokenizer, "text_encoder": encoder}

    def tiny_scheduler(self) -> Any:
        """The scheduler a tiny pipeline is saved with: the family's, with its shift settings."""
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler(**self.default_scheduler_config())

    def hidden_dim(self, transformer: nn.Module) -> int:
        """Width D of the block outputs CREPA aligns."""
        config = self.unwrap(transformer).config
        return config.num_attention_heads * config.attention_head_dim

    @abstractmethod
    def token_grid(self, transformer: nn.Module, latent_shape: torch.Size) -> tuple[int, int, int]:
        """(F, hs, ws) of the block tokens for latents of shape (B, C, F, H, W)."""

    def block_tokens(self, output: torch.Tensor | tuple) -> torch.Tensor:
        """The (B, N, D) video tokens inside a block's forward output."""
        return output[0] if isinstance(output, tuple) else output

    def tokens_to_grid(self, transformer: nn.Module, tokens: torch.Tensor,
                       grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, D) tokens of `transformer`'s blocks -> (B, F, hs, ws, D); here they are in (t, h, w) raster order.

        Families whose blocks order tokens otherwise override this."""
        frames, height, width = grid
        batch, count, dim = tokens.shape
        if count != frames * height * width:
            raise ValueError(
                f"{self.name}: block output has {count} tokens, expected {frames}x{height}x{width} from the latents"
            )
        return tokens.reshape(batch, frames, height, width, dim)

    @abstractmethod
    def tiny_transformer_config(self) -> dict:
        """Constructor kwargs of a few-thousand-parameter transformer for tests and the demo."""

    def tiny_transformer(self) -> nn.Module:
        """A random transformer of `tiny_transformer_config`; families whose initialisation zeroes layers that
        matter (e.g. modulation, which makes blocks the identity) randomise them here, so tests see real work."""
        return self.transformer_class()(**self.tiny_transformer_config()).eval()
