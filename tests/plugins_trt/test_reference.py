"""plugins_trt.reference: the numpy definition of the attention math, checked against a hand-worked
example and torch's own attention; the quantized model against what quantization must preserve."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from wanrt.plugins_trt.reference import attention, key_mean_rows, quantized_attention, round_to_format


def test_hand_worked_example():
    # one query, two keys: scores 0.5*[1*1, 1*3] = [0.5, 1.5]; weights e^0.5, e^1.5 over their sum
    q = np.array([[1.0, 0.0]])
    k = np.array([[1.0, 2.0], [3.0, -1.0]])
    v = np.array([[10.0, 0.0], [0.0, 10.0]])
    w = np.exp([0.5, 1.5]) / np.exp([0.5, 1.5]).sum()
    np.testing.assert_allclose(attention(q, k, v, 0.5), [[10 * w[0], 10 * w[1]]], rtol=1e-15)


@pytest.mark.parametrize("shape_q,shape_k", [((2, 3, 37, 64), (2, 3, 53, 64)), ((1, 2, 1, 128), (1, 2, 300, 128))])
def test_matches_torch_sdpa(shape_q, shape_k):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal(shape_q), rng.standard_normal(shape_k), rng.standard_normal(shape_k)
    scale = 1 / math.sqrt(shape_q[-1])
    expected = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(t) for t in (q, k, v)), scale=scale)
    np.testing.assert_allclose(attention(q, k, v, scale), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_large_scores_do_not_overflow():
    q = np.full((1, 4), 100.0)
    k = np.array([[100.0] * 4, [99.0] * 4])
    out = attention(q, k, np.eye(2, 4), 1.0)  # scores 40000 and 39600: softmax = [1, e^-400]
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0, 0.0]], atol=1e-150)


def test_key_mean_rows():
    assert key_mean_rows(5, 512).tolist() == [0, 1, 2, 3, 4]
    rows = key_mean_rows(1000, 4)  # evenly spread: i * Sk // 4
    assert rows.tolist() == [0, 250, 500, 750]


def test_round_to_format():
    x = np.array([0.0, 1.0625, 1.1875, -3.3, 447.0, 448.0, 1e-4], dtype=np.float32)
    expected = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)  # e4m3 round to nearest even
    np.testing.assert_array_equal(round_to_format(x, "fp8"), expected)
    assert round_to_format(np.array([2.5, -2.5, 1.49, 127.0], dtype=np.float32), "int8").tolist() == [3, -3, 1, 127]


def test_quantized_attention_is_near_exact_and_ignores_key_bias():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 100, 64)).astype(np.float32) for _ in range(3))
    exact = attention(q, k, v, 0.125)
    for fmt, tol in (("fp8", 6e-2), ("int8", 2e-2)):
        out = quantized_attention(q, k, v, 0.125, fmt, block_n=32, mean_rows=512)
        err = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        assert err < tol, (fmt, err)
        # a per-channel bias on K changes q.k by the same amount for every key: after smoothing
        # the codes are identical, so the output is too (up to float32 rounding of k - mean)
        biased = quantized_attention(q, k + 25.0 * rng.standard_normal(64).astype(np.float32), v, 0.125, fmt, 32, 512)
        assert np.linalg.norm(biased - out) / np.linalg.norm(out) < tol / 4, fmt
