"""DINOv2 patch features per latent frame: the frozen teacher CREPA aligns to."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from crepa.encoders import resolve_encoder
from crepa.errors import UserError
from precompute.config import TeacherSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

def latent_frame_groups(pixel_frames: int, temporal_compression: int) -> list[list[int]]:
    """Pixel frames each latent frame covers: [0], then [t*(i-1)+1 .. t*i] for i >= 1."""
    t = temporal_compression
    count = 1 + (pixel_frames - 1) // t
    return [[0]] + [list(range(t * (i - 1) + 1, t * i + 1)) for i in range(1, count)]


def encoder_input_size(height: int, width: int, image_size: int, resize: str, patch: int) -> tuple[int, int]:
    """(h, w) fed to the encoder: square, or the clip's aspect at about image_size^2 pixels."""
    if resize == "square":
        return image_size, image_size
    scale = image_size / math.sqrt(height * width)
    return (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))


def teacher_grid(height: int, width: int, settings: TeacherSettings, patch: int) -> tuple[int, int]:
    """Stored (ht, wt) for clips of this pixel size, after pooling."""
    h, w = encoder_input_size(height, width, settings.image_size, settings.resize, patch)
    return math.ceil(h // patch / settings.pool), math.ceil(w // patch / settings.pool)


def _unit_float(frames: torch.Tensor) -> torch.Tensor:
    """float32 frames in [0, 1], from uint8 or any float dtype."""
    if frames.dtype == torch.uint8:
        return frames.float().div_(255.0)
    return frames.float()


class TeacherEncoder:
    """A frozen DINOv2 that turns clip frames into per-latent-frame patch and CLS features."""

    def __init__(self, settings: TeacherSettings, device: torch.device, dtype: torch.dtype, batch_size: int = 16):
        from transformers import AutoModel

        from crepa.families.loading import load_pretrained

        self.settings = settings
        self.device = device
        self.batch_size = batch_size
        self.model = load_pretrained(AutoModel, None, "encoder", resolve_encoder(settings.encoder), dtype=dtype)
        config = self.model.config
        if not hasattr(config, "patch_size") or not hasattr(config, "hidden_size"):
            raise UserError(f"encoder {settings.encoder!r} is not a ViT with patch tokens (got {type(self.model)})")
        self.model.to(device).eval().requires_grad_(False)
        self.patch = config.patch_size
        self.dim = config.hidden_size
        self.prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)  # CLS, then registers
        self.dtype = dtype

    @torch.no_grad()
    def frame_features(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) float in [0, 1] or uint8 -> patch tokens (N, ht, wt, D) and CLS (N, D), fp32.

        uint8 frames are converted batch by batch on the device: a quarter of the bytes to move, and no
        float copy of the whole clip. Batches are of equal size (up to one frame), at most `batch_size`.
        """
        h, w = encoder_input_size(*frames.shape[2:], self.settings.image_size, self.settings.resize, self.patch)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        patches, cls = [], []
        for batch in frames.tensor_split(math.ceil(len(frames) / self.batch_size)):
            batch = _unit_float(batch.to(self.device))
            batch = F.interpolate(batch, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
            batch = ((batch.clamp(0, 1) - mean) / std).to(self.dtype)
            # (n, prefix + gh*gw, D): last_hidden_state is taken after the final layernorm
            tokens = self.model(pixel_values=batch).last_hidden_state.float()
            grid = tokens[:, self.prefix_tokens:].reshape(len(batch), h // self.patch, w // self.patch, self.dim)
            if self.settings.pool > 1:
                pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), self.settings.pool, ceil_mode=True)
                grid = pooled.permute(0, 2, 3, 1)
            patches.append(grid)
            cls.append(tokens[:, 0])
        return torch.cat(patches), torch.cat(cls)

    def latent_features(self, frames: torch.Tensor, temporal_compression: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_pix, 3, H, W) float in [0, 1] or uint8 -> per latent frame patch (f, ht, wt, D) and CLS (f, D), fp32.

        stride encodes only the pixel frame t_c*i of each latent frame; mean encodes every covered
        frame and averages within each group.
        """
        groups = latent_frame_groups(frames.shape[0], temporal_compression)
        if self.settings.frames == "stride":
            return self.frame_features(frames[[group[-1] for group in groups]])
        patch, cls = self.frame_features(frames[: groups[-1][-1] + 1])
        index = torch.tensor([i for i, group in enumerate(groups) for _ in group], device=patch.device)
        counts = torch.tensor([len(group) for group in groups], device=patch.device, dtype=patch.dtype)
        summed_patch = torch.zeros(len(groups), *patch.shape[1:], device=patch.device).index_add_(0, index, patch)
        summed_cls = torch.zeros(len(groups), cls.shape[1], device=cls.device).index_add_(0, index, cls)
        return summed_patch / counts.view(-1, 1, 1, 1), summed_cls / counts.view(-1, 1)
