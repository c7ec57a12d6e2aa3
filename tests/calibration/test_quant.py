"""Quantization math against the formats' facts, with numpy / ml_dtypes as the rounding reference.

Facts (shared/reference/lightx2v-formats.md §1, LightX2V `tools/convert/quant/quant.py`):
scale = amax(|w|) over a channel (LightX2V: per output row, `amax(dim=1)`) or the whole tensor
(ComfyUI), clamped to 1e-5, divided by qmax (fp8 e4m3: `torch.finfo(float8_e4m3fn).max` = 448;
int8: 127); fp8 codes are w / scale clipped to +-448 and rounded to nearest, int8 codes are
round(w / scale) clamped to [-128, 127].
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from wanrt.calibration.formats import FORMAT_OF_DTYPE, FORMATS, quant_format
from wanrt.calibration.quant import (
    QuantErrorSummary,
    code_dtype,
    decode,
    dequantize,
    encode,
    quantization_error,
    quantize,
    quantize_measured,
)
from wanrt.engines.errors import WanrtError


@pytest.fixture(scope="module")
def w() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different range
    w[3] = 0.0  # an all-zero row gets a finite scale
    w[5, :4] = torch.tensor([1e-9, -1e-9, 3e-7, 0.0])  # values that fall into fp8 subnormals / zero
    return w


def np_amax(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| over every axis but `axis` (kept), or over the whole array."""
    a = np.abs(w.astype(np.float64))
    if axis is None:
        return np.array(a.max())
    return a.max(axis=tuple(d for d in range(a.ndim) if d != axis), keepdims=True)


def np_codes(x: np.ndarray, fmt: str) -> np.ndarray:
    """The format's rounding of already-scaled values, in float32."""
    if fmt == "fp8":
        return np.clip(x, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return np.clip(np.round(x), -128, 127).astype(np.float32)


def test_formats_match_the_dtypes():
    """qmax / qmin are the code dtypes' own limits; storage names map back to the formats."""
    fp8, int8 = FORMATS["fp8"], FORMATS["int8"]
    assert code_dtype(fp8) == torch.float8_e4m3fn and code_dtype("int8") == torch.int8
    assert (fp8.qmin, fp8.qmax) == (torch.finfo(torch.float8_e4m3fn).min, torch.finfo(torch.float8_e4m3fn).max) == (-448, 448)
    assert (int8.qmin, int8.qmax) == (torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max)
    assert FORMAT_OF_DTYPE == {"fp8_e4m3": "fp8", "int8": "int8"}
    with pytest.raises(WanrtError, match="unknown weight quantization 'fp4'"):
        quant_format("fp4")
    with pytest.raises(WanrtError, match="'nvfp4'"):
        quantize(torch.ones(2, 2), "nvfp4")


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("axis", [0, None])
def test_codes_and_scales_as_lightx2v_and_comfyui(w, fmt, axis):
    """axis 0 is LightX2V's per-output-channel [out, 1] scale, None ComfyUI's per-tensor scalar."""
    q, scale = quantize(w, fmt, axis)
    assert q.dtype == code_dtype(fmt) and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == ((64, 1) if axis == 0 else ())
    qmax = 448.0 if fmt == "fp8" else 127.0
    np.testing.assert_allclose(scale.numpy(), np.maximum(np_amax(w.numpy(), axis), 1e-5) / qmax, rtol=1e-6)
    np.testing.assert_array_equal(q.to(torch.float32).numpy(), np_codes(w.numpy() / scale.numpy(), fmt))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("shape,axis", [((64, 96), 1), ((6, 5, 4), 1), ((6, 5, 4), -1), ((6, 5, 4), 0), ((7,), 0)])
def test_per_channel_along_any_axis(fmt, shape, axis):
    """One scale per index of `axis` (the others reduced), shaped to broadcast: the layout Q/DQ graphs need."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[axis]).reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    q, scale = quantize(x, fmt, axis)
    want_shape = tuple(n if d == axis % len(shape) else 1 for d, n in enumerate(shape))
    assert scale.shape == want_shape
    qmax = 448.0 if fmt == "fp8" else 127.0
    np.testing.assert_allclose(scale.numpy(), np.maximum(np_amax(x.numpy(), axis % len(shape)), 1e-5) / qmax, rtol=1e-6)
    np.testing.assert_array_equal(q.float().numpy(), np_codes(x.numpy() / scale.numpy(), fmt))
    flat = scale.reshape(-1)  # a 1-D scale (as ONNX DequantizeLinear takes it) with the axis named
    assert torch.equal(dequantize(q, flat, axis), q.float() * scale)


def test_hand_worked_example():
    """A 2x3 weight worked by hand: rows amax 2 and 0.5 (per channel), tensor amax 2 (per tensor)."""
    w = torch.tensor([[2.0, -1.0, 0.5], [0.25, 0.5, -0.125]])
    q, s = quantize(w, "int8", 0)
    assert torch.equal(s, torch.tensor([[2 / 127], [0.5 / 127]], dtype=torch.float32))
    assert q.tolist() == [[127, -64, 32], [64, 127, -32]]  # 63.5 and 31.75 round to 64 and 32
    q, s = quantize(w, "fp8", None)
    assert float(s) == pytest.approx(2 / 448, rel=1e-7)
    # w / s = 448, -224, 112, 56, 112, -28: all exact in e4m3
    assert q.float().tolist() == [[448.0, -224.0, 112.0], [56.0, 112.0, -28.0]]
    assert torch.allclose(dequantize(q, s, None), w, rtol=1e-6)


@pytest.mark.parametrize("fmt,axis", [("fp8", 0), ("fp8", None), ("int8", 0), ("int8", None)])
def test_dequantized_error_within_the_format_bound(w, fmt, axis):
    q, scale = quantize(w, fmt, axis)
    deq = dequantize(q, scale, axis)
    s = scale.to(torch.float64)
    err = (deq.double() - w.double()).abs()
    if fmt == "fp8":
        # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative for normals; subnormal spacing 2^-9 -> half 2^-10
        bound = torch.maximum(w.double().abs() * 2**-4, s * 2**-10)
    else:
        bound = (s / 2).expand_as(err)
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert torch.equal(deq[3], torch.zeros(96))


@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_decode_table_equals_torch_cast(fp8, target):
    every = torch.arange(256, dtype=torch.uint8).view(fp8).reshape(4, 64)
    got, want = decode(every, target), every.to(target)
    assert got.dtype == target and got.shape == (4, 64)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    big = torch.randint(0, 256, (3, 70001), dtype=torch.uint8).view(fp8)  # more than one gather chunk, into a given buffer
    out = torch.empty(big.shape, dtype=target)
    assert decode(big, target, out=out) is out
    assert torch.equal(out.nan_to_num(), big.to(target).nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_dequantize_in_any_dtype_equals_the_fp32_product_cast(w, fmt, dtype):
    q, scale = quantize(w, fmt, 0)
    want = (q.double() * scale.double()).float().to(dtype)  # codes * scale in fp32 (exact in fp64 first), then cast
    assert torch.equal(dequantize(q, scale, 0, dtype), want)
    assert torch.equal(dequantize(q, scale.to(torch.bfloat16), 0), q.float() * scale.to(torch.bfloat16).float())
    assert torch.equal(dequantize(q, None), q.float())  # unscaled: the codes


def test_encode_clamps_without_touching_the_input():
    x = torch.tensor([500.0, -1000.0, 3.3, 0.01])
    before = x.clone()
    assert encode(x, "fp8").float().tolist() == [448.0, -448.0, 3.25, float(np.float32(0.01).astype(ml_dtypes.float8_e4m3fn))]
    assert encode(x, "int8").tolist() == [127, -128, 3, 0]
    assert torch.equal(x, before)


def test_quantization_error_report(w):
    q, scale = quantize(w, "fp8", 0)
    e = quantization_error(w, q, scale)
    d = q.to(torch.float64).numpy() * scale.to(torch.float64).numpy() - w.numpy().astype(np.float64)
    assert e.max_abs == pytest.approx(np.abs(d).max(), rel=1e-5)
    assert e.rel_rms == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w.numpy().astype(np.float64)), rel=1e-5)
    summary = QuantErrorSummary()
    summary.add("a", e)
    q2, s2 = quantize(w, "int8", 0)
    e2 = quantization_error(w, q2, s2)
    summary.add("b", e2)
    assert summary.tensors == 2 and summary.worst_key == "a" and summary.worst_rel_rms == e.rel_rms
    assert summary.overall_rel_rms == pytest.approx(np.sqrt((e.rel_rms**2 + e2.rel_rms**2) / 2), rel=1e-6)


def test_bf16_input_is_quantized_in_fp32(w):
    q, _ = quantize(w.to(torch.bfloat16), "fp8")
    want, _ = quantize(w.to(torch.bfloat16).to(torch.float32), "fp8")
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("fmt,axis", [("fp8", 0), ("int8", 0), ("fp8", None), ("int8", None)])
def test_quantize_measured_matches_quantize_and_error(w, fmt, axis):
    q, scale = quantize(w, fmt, axis)
    work = w.clone()
    q2, scale2, err = quantize_measured(work, fmt, axis, overwrite=True)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(scale, scale2)
    d = q.double() * scale.double() - w.double()
    assert err.max_abs == pytest.approx(float(d.abs().max()), rel=1e-4)
    assert err.rel_rms == pytest.approx(float(d.norm() / w.double().norm()), rel=1e-4)
    assert not torch.equal(work, w)  # the work buffer was used


def test_quantize_measured_on_every_nth_row(w):
    q, scale, err = quantize_measured(w, "fp8", 0, row_stride=8)
    d = (q.double() * scale.double() - w.double())[::8]
    assert err.rel_rms == pytest.approx(float(d.norm() / w.double()[::8].norm()), rel=1e-4)
    assert err.max_abs == pytest.approx(float(d.abs().max()), rel=1e-4)
    q1, s1, e1 = quantize_measured(w, "int8", 1, row_stride=8)  # a [1, 96] scale: every row sees all of it
    d1 = (q1.double() * s1.double() - w.double())[::8]
    assert s1.shape == (1, 96) and e1.rel_rms == pytest.approx(float(d1.norm() / w.double()[::8].norm()), rel=1e-4)
