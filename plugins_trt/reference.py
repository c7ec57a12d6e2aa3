"""The attention math in numpy, as the definition the kernels are tested against.

`attention` is exact (float64).  `quantized_attention` is the same math with QK^T computed the
way our fp8 / int8 kernels compute it (K smoothing, per-row Q scales, per-block K scales,
rounding), written from the description in `flash_kernel.py`, so a test can tell a kernel that
quantizes as specified from one that merely lands near the exact result.
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0
INT8_MAX = 127.0


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """softmax(scale * q @ k^T) @ v over the last two axes ([..., Sq, D], [..., Sk, D]), in float64."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.matmul(weights, v)


def key_mean_rows(seq_k: int, mean_rows: int) -> np.ndarray:
    """The key rows the smoothing mean is taken over: all of them, or `mean_rows` spread evenly."""
    if seq_k <= mean_rows:
        return np.arange(seq_k)
    return (np.arange(mean_rows) * seq_k) // mean_rows


def round_to_format(x: np.ndarray, qk_format: str) -> np.ndarray:
    """x (float32, inside the format's range) rounded to fp8 e4m3 (ties to even) or int8 (half away from zero)."""
    if qk_format == "fp8":
        import ml_dtypes

        return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if qk_format == "int8":
        return np.trunc(x + np.where(x >= 0, 0.5, -0.5)).astype(np.float32)
    raise ValueError(f"unknown QK format {qk_format!r}")


def quantized_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, qk_format: str,
                        block_n: int, mean_rows: int) -> np.ndarray:
    """attention() with QK^T in fp8 e4m3 or int8 as our kernels compute it ([..., S, D] inputs), in float64.

    K - mean(K over `key_mean_rows`) is quantized with one scale per `block_n` keys, Q with one
    scale per query row; both scales map the block's largest magnitude to the format's largest
    value.  P @ V is exact here (the kernels run it in the input dtype).
    """
    qmax = E4M3_MAX if qk_format == "fp8" else INT8_MAX
    q, k = np.asarray(q, dtype=np.float32), np.asarray(k, dtype=np.float32)
    seq_k = k.shape[-2]
    k = k - k[..., key_mean_rows(seq_k, mean_rows), :].mean(axis=-2, keepdims=True)

    q_amax = np.maximum(np.abs(q).max(axis=-1, keepdims=True), 1e-30)
    q_codes = round_to_format(q * (qmax / q_amax), qk_format)
    k_codes = np.empty_like(k)
    k_step = np.empty(k.shape[:-1] + (1,), dtype=np.float32)
    for start in range(0, seq_k, block_n):
        block = k[..., start:start + block_n, :]
        amax = np.maximum(np.abs(block).max(axis=(-1, -2), keepdims=True), 1e-30)
        k_codes[..., start:start + block_n, :] = round_to_format(block * (qmax / amax), qk_format)
        k_step[..., start:start + block_n, :] = amax / qmax
    q_values = q_codes.astype(np.float64) * (q_amax / qmax)
    k_values = k_codes.astype(np.float64) * k_step
    return attention(q_values, k_values, v, scale)
