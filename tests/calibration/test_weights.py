"""Weight quantization against the formats' facts, with numpy / ml_dtypes as the rounding reference.

Facts (shared/reference/lightx2v-formats.md §1): LightX2V per-output-channel
scale = amax(|w|, dim=1).clamp(1e-5) / 448 (fp8 e4m3, round to nearest) or / 127 (int8, round,
clamp to [-128, 127]); ComfyUI per-tensor scale = amax(|w|) / 448.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from wanrt.calibration.weights import (
    QuantErrorSummary,
    dequantize,
    quantization_error,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_int8_per_channel,
    quantize_int8_per_tensor,
    quantize_measured,
    quantize_weight,
)
from wanrt.engines.errors import WanrtError


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different range
    w[3] = 0.0  # an all-zero row gets a finite scale
    w[5, :4] = torch.tensor([1e-9, -1e-9, 3e-7, 0.0])  # values that fall into fp8 subnormals / zero
    return w


def np_amax(w: torch.Tensor, per_channel: bool) -> np.ndarray:
    a = np.abs(w.numpy().astype(np.float64))
    return a.max(axis=1, keepdims=True) if per_channel else np.array(a.max())


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_codes_and_scales(w, per_channel):
    q, scale = quantize_fp8_per_channel(w) if per_channel else quantize_fp8_per_tensor(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == ((64, 1) if per_channel else ())
    want_scale = np.maximum(np_amax(w, per_channel), 1e-5) / 448.0
    np.testing.assert_allclose(scale.numpy(), want_scale, rtol=1e-6)
    # rounding reference: ml_dtypes' float8_e4m3fn cast (round to nearest even) of w / scale
    x = np.clip(w.numpy() / scale.numpy(), -448, 448).astype(np.float32)
    want_codes = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(q.to(torch.float32).numpy(), want_codes)


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_codes_and_scales(w, per_channel):
    q, scale = quantize_int8_per_channel(w) if per_channel else quantize_int8_per_tensor(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    want_scale = np.maximum(np_amax(w, per_channel), 1e-5) / 127.0
    np.testing.assert_allclose(scale.numpy(), want_scale, rtol=1e-6)
    want_codes = np.clip(np.round(w.numpy() / scale.numpy()), -128, 127)
    np.testing.assert_array_equal(q.numpy(), want_codes)


@pytest.mark.parametrize("fmt,layout", [("fp8", "per_channel"), ("fp8", "per_tensor"), ("int8", "per_channel"), ("int8", "per_tensor")])
def test_dequantized_error_within_the_format_bound(w, fmt, layout):
    q, scale = quantize_weight(w, fmt, layout)
    deq = dequantize(q, scale)
    s = scale.to(torch.float64).reshape(-1, 1) if scale.numel() > 1 else scale.to(torch.float64)
    err = (deq.double() - w.double()).abs()
    if fmt == "fp8":
        # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative for normals; subnormal spacing 2^-9 -> half 2^-10
        bound = torch.maximum(w.double().abs() * 2**-4, s * 2**-10)
    else:
        bound = (s / 2).expand_as(err)
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert torch.equal(deq[3], torch.zeros(96))


def test_quantization_error_report(w):
    q, scale = quantize_fp8_per_channel(w)
    e = quantization_error(w, q, scale)
    d = q.to(torch.float64).numpy() * scale.to(torch.float64).numpy() - w.numpy().astype(np.float64)
    assert e.max_abs == pytest.approx(np.abs(d).max(), rel=1e-5)
    assert e.rel_rms == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w.numpy().astype(np.float64)), rel=1e-5)
    summary = QuantErrorSummary()
    summary.add("a", e)
    q2, s2 = quantize_int8_per_channel(w)
    e2 = quantization_error(w, q2, s2)
    summary.add("b", e2)
    assert summary.tensors == 2 and summary.worst_key == "a" and summary.worst_rel_rms == e.rel_rms
    assert summary.overall_rel_rms == pytest.approx(np.sqrt((e.rel_rms**2 + e2.rel_rms**2) / 2), rel=1e-6)


def test_bf16_input_and_unknown_format(w):
    q, scale = quantize_fp8_per_channel(w.to(torch.bfloat16))
    want, _ = quantize_fp8_per_channel(w.to(torch.bfloat16).to(torch.float32))
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(WanrtError, match="unknown weight quantization 'fp4'"):
        quantize_weight(w, "fp4")
    with pytest.raises(WanrtError, match="'per_block'"):
        quantize_weight(w, "fp8", "per_block")


@pytest.mark.parametrize("fmt,layout", [("fp8", "per_channel"), ("int8", "per_channel"), ("fp8", "per_tensor"), ("int8", "per_tensor")])
def test_quantize_measured_matches_quantize_and_error(w, fmt, layout):
    q, scale = quantize_weight(w, fmt, layout)
    work = w.clone()
    q2, scale2, err = quantize_measured(work, fmt, layout, overwrite=True)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(scale, scale2)
    s = scale.double().reshape(-1, 1) if layout == "per_channel" else scale.double()
    d = q.double() * s - w.double()
    assert err.max_abs == pytest.approx(float(d.abs().max()), rel=1e-4)
    assert err.rel_rms == pytest.approx(float(d.norm() / w.double().norm()), rel=1e-4)
    assert not torch.equal(work, w)  # the work buffer was used


def test_quantize_measured_on_every_nth_row(w):
    q, scale, err = quantize_measured(w, "fp8", "per_channel", row_stride=8)
    d = (q.double() * scale.double() - w.double())[::8]
    assert err.rel_rms == pytest.approx(float(d.norm() / w.double()[::8].norm()), rel=1e-4)
    assert err.max_abs == pytest.approx(float(d.abs().max()), rel=1e-4)
