"""Symmetric int8 features with one fp16 scale per token: a quarter of fp32's bytes plus 2 bytes a token.

A token is the last axis (the channels of one patch), so one loud patch does not cost the others
their precision. The scale is rounded up to the next fp16 value, so absmax / scale <= 127: nothing
is clipped and every element comes back within half a step, |x - dequantize(q, scale)| <= scale / 2.
"""

from __future__ import annotations

import numpy as np

from crepa.errors import UserError

QMAX = 127
"""Largest int8 step used; -127..127 keeps the grid symmetric (-128 is never produced)."""


def _scales(absmax: np.ndarray) -> np.ndarray:
    """fp16 scales >= absmax / QMAX (rounded up, so the largest element maps to at most QMAX steps)."""
    exact = absmax / QMAX
    scale = exact.astype(np.float16)
    short = scale.astype(np.float32) < exact  # rounded down (or underflowed to 0): take the next fp16 up
    scale[short] = np.nextafter(scale[short], np.float16(np.inf))
    return scale


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) floats -> int8 (..., D) steps and fp16 (..., 1) scales, symmetric absmax over the last axis.

    An all-zero token gets scale 0 and zero steps. Raises ValueError on non-finite values or values too
    large for an fp16 scale (|x| > 65504 * 127).
    """
    x = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1, keepdims=True)  # (..., 1)
    if not (absmax / QMAX <= np.finfo(np.float16).max).all():  # also false for inf and nan
        raise UserError("cannot quantise non-finite values or values beyond the fp16 scale range (|x| > 8.3e6)")
    scale = _scales(absmax)
    divisor = np.where(scale == 0, np.float32(1), scale.astype(np.float32))  # zero tokens divide by 1
    steps = np.clip(np.rint(x / divisor), -QMAX, QMAX)  # clip only guards float rounding at exactly QMAX
    return steps.astype(np.int8), scale


def dequantize_per_token(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 (..., D) steps and (..., 1) scales -> float32 (..., D) features."""
    return q.astype(np.float32) * scale.astype(np.float32)
