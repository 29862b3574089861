"""Per-token int8 quantisation against hand-computed steps and scales, and its half-step error bound."""

import numpy as np
import pytest

from crepa.cache.quantize import dequantize_per_token, quantize_per_token


def test_hand_computed_tokens():
    x = np.array([[63.5, -31.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)  # absmax 63.5 -> scale 0.5
    q, scale = quantize_per_token(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (2, 1)
    assert scale[:, 0].tolist() == [0.5, 0.0]
    assert q.tolist() == [[127, -62, 1, 0], [0, 0, 0, 0]]  # 0.3 / 0.5 = 0.6 rounds to 1
    np.testing.assert_array_equal(dequantize_per_token(q, scale), [[63.5, -31.0, 0.5, 0.0], [0, 0, 0, 0]])


def test_scale_is_rounded_up_to_the_next_fp16():
    # absmax / 127 = 0.00999: the nearest fp16 is 0.0099868..., below it, so the scale is the next one up
    x = np.array([127 * 0.00999, -0.5], np.float32)
    q, scale = quantize_per_token(x)
    assert scale.shape == (1,) and scale[0] == np.float16(0.0099945068359375)
    assert q.tolist() == [127, -50]  # 1.26873 / 0.0099945 = 126.94; -0.5 / 0.0099945 = -50.03


def test_round_trip_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32) * rng.uniform(1e-9, 1e3, (3, 5, 1)).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero token among them
    q, scale = quantize_per_token(x)
    assert q.shape == x.shape and scale.shape == (3, 5, 1)
    assert np.abs(q.astype(np.int32)).max() <= 127
    error = np.abs(x - dequantize_per_token(q, scale))
    assert (error <= scale.astype(np.float32) / 2 * (1 + 1e-6)).all()
    assert (dequantize_per_token(q, scale)[1, 2] == 0).all()


def test_tiny_tokens_keep_a_nonzero_scale():
    q, scale = quantize_per_token(np.array([1e-9, -2e-9], np.float32))
    assert scale[0] == np.nextafter(np.float16(0), np.float16(1))  # smallest fp16 instead of underflow to 0
    assert q.tolist() == [0, 0]


@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e7])
def test_unrepresentable_values_raise(bad):
    with pytest.raises(ValueError, match="non-finite"):
        quantize_per_token(np.array([1.0, bad], np.float32))
