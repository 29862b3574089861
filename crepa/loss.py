"""The CREPA alignment score: a DiT block's per-frame tokens against a frozen teacher's.

Everything here is pure tensor maths so it can be tested against hand-computed values and
reused unchanged by the trainer and the benchmarks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crepa.errors import UserError


@dataclass
class CrepaScores:
    """What `crepa_scores` measured for one batch.

    per_video: (B,) S_b, the summed (optionally frame-averaged) per-frame scores A(f).
    alignment_score: 0-dim, mean of A(f) over clips and frames.
    similarity_self: 0-dim, mean of s(f, f) over clips and frames.
    """

    per_video: torch.Tensor
    alignment_score: torch.Tensor
    similarity_self: torch.Tensor


def neighbour_offsets(distance: int, num_frames: int, cumulative: bool) -> list[int]:
    """Offsets O whose neighbours are aligned: {d'} or {1..d'} with d' = min(d, F-1)."""
    if distance < 0:
        raise UserError(f"crepa distance must be >= 0, got {distance}")
    clamped = min(distance, num_frames - 1)
    if clamped <= 0:
        return []
    return list(range(1, clamped + 1)) if cumulative else [clamped]


@functools.lru_cache(maxsize=64)
def _resample_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D bilinear resampling with antialiasing, align_corners=False.

    Read off `F.interpolate` applied to the unit vectors, so the weights are exactly PyTorch's. The
    basis images are two pixels wide: PyTorch's CPU antialias kernel returns a constant for inputs
    one pixel wide.
    """
    basis = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, size_in, 1).expand(size_in, 1, size_in, 2)
    resampled = F.interpolate(basis, size=(size_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return resampled[:, 0, :, 0].T.contiguous()


def resample_grid(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample (B, F, h, w, D) to (B, F, size[0], size[1], D) in 2-D.

    Bilinear with antialiasing so a downsampled grid averages its footprint instead of
    aliasing; the spatial layout is preserved because we never flatten the raster. The filter is
    separable, so it runs as two matrix products over the channel-last grid: several times faster
    than `F.interpolate` on channel-first copies, forward and backward.
    """
    b, f, h, w, d = tokens.shape
    height, width = size
    if (h, w) == (height, width):
        return tokens
    rows = _resample_matrix(h, height).to(tokens.device, tokens.dtype)  # (height, h)
    cols = _resample_matrix(w, width).to(tokens.device, tokens.dtype)  # (width, w)
    grid = torch.matmul(cols, tokens.reshape(b * f * h, w, d))  # (B*F*h, width, D)
    grid = torch.matmul(rows, grid.reshape(b * f, h, width * d))  # (B*F, height, width*D)
    return grid.reshape(b, f, height, width, d)


def align_grids(
    student: torch.Tensor, teacher: torch.Tensor, spatial_align: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring both sides to one token layout, returned flat as (B, F, N, D).

    With `spatial_align`, the grid with more tokens is resampled to the other's (h, w); on a
    tie the teacher moves, since it carries no gradient. Without it, both sides are
    mean-pooled to one token per frame.
    """
    if not spatial_align:
        return student.mean(dim=(2, 3)).unsqueeze(2), teacher.mean(dim=(2, 3)).unsqueeze(2)
    hs, ws = student.shape[2:4]
    ht, wt = teacher.shape[2:4]
    if (hs, ws) != (ht, wt):
        if hs * ws > ht * wt:
            student = resample_grid(student, (ht, wt))
        else:
            teacher = resample_grid(teacher, (hs, ws))
    return student.flatten(2, 3), teacher.flatten(2, 3)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """`F.normalize(x, dim=-1)` as a product with the reciprocal norm: one broadcast multiply instead
    of a division by an expanded tensor, which makes the backward pass about a third cheaper."""
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()


def _frame_similarity(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(F', B, N*D) x (F', B, N*D) -> (F', B): per frame, the sum over tokens of the dot products.

    One batched (1 x K) @ (K x 1) product over contiguous frame slices: no temporaries of the
    features' size and no layout copies, forward or backward.
    """
    frames, batch, size = p.shape
    return torch.bmm(p.reshape(frames * batch, 1, size), y.reshape(frames * batch, size, 1)).view(frames, batch)


def crepa_scores(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance: int = 1,
    tau: float = 1.0,
    cumulative: bool = False,
    normalize_by_frames: bool = True,
    normalize_neighbour_sum: bool = False,
    spatial_align: bool = True,
) -> CrepaScores:
    """Cross-frame alignment of projected student tokens with teacher tokens.

    student: (B, F, hs, ws, D), already projected to the teacher's width, not normalised.
    teacher: (B, F, ht, wt, D), not normalised; treated as a constant (detached).

    A(f) = s(f, f) + sum_{o in O} w_o [s(f, f+o) if f+o < F] + w_o [s(f, f-o) if f-o >= 0],
    w_o = exp(-o / tau). The work is one similarity per offset over frame slices, never a
    loop over frames.
    """
    if student.ndim != 5 or teacher.ndim != 5:
        raise ValueError(
            f"student and teacher must be (B, F, h, w, D); got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[:2] != teacher.shape[:2] or student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            "student and teacher must agree on batch, frames and channels; "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if tau <= 0:
        raise UserError(f"crepa tau must be > 0, got {tau}")

    teacher = teacher.detach().to(student.dtype)
    p, y = align_grids(student, teacher, spatial_align)
    tokens, num_frames = p.shape[2], p.shape[1]
    # (B, F, N, D) -> (F, B, N*D): slicing frames then yields contiguous blocks (a no-op copy when B = 1)
    p = _normalize(p).flatten(2).transpose(0, 1).contiguous()
    y = _normalize(y).flatten(2).transpose(0, 1).contiguous()

    self_sim = _frame_similarity(p, y).T / tokens  # (B, F)
    scores = self_sim
    applied_weight = torch.zeros(num_frames, dtype=p.dtype, device=p.device)
    for offset in neighbour_offsets(distance, num_frames, cumulative):
        weight = math.exp(-offset / tau)
        # Frame f looks forward at f+o (valid for f < F-o) and backward at f-o (f >= o);
        # the missing neighbours at the edges contribute nothing (zero padding).
        forward = _frame_similarity(p[:-offset], y[offset:]).T / tokens  # (B, F-o)
        backward = _frame_similarity(p[offset:], y[:-offset]).T / tokens  # (B, F-o)
        scores = scores + weight * (F.pad(forward, (0, offset)) + F.pad(backward, (offset, 0)))
        applied_weight[:-offset] += weight
        applied_weight[offset:] += weight

    if normalize_neighbour_sum:
        scores = scores / (1.0 + applied_weight)
    per_video = scores.sum(dim=1)
    if normalize_by_frames:
        per_video = per_video / num_frames
    return CrepaScores(per_video=per_video, alignment_score=scores.mean(), similarity_self=self_sim.mean())


def crepa_loss(scores: CrepaScores, weight: float) -> torch.Tensor:
    """L_crepa = -lambda * mean_b S_b, the term added to the flow-matching loss."""
    return -weight * scores.per_video.mean()
