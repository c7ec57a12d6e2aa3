"""Quantize and dequantize tensors per tensor or per channel along any axis, in the formats of `formats`.

`quantize(w, fmt, axis)` gives `(codes, scale)`: one float32 scale per index of `axis`, shaped to
broadcast against `w` (`[out, 1]` for axis 0 of a matrix: LightX2V's `weight_scale`), or a scalar
for `axis=None` (ComfyUI's `scale_weight`); `dequantize(codes, scale, axis)` is `codes * scale`.
The math runs in float32 whatever the input dtype.  fp8 codes are decoded through a 256-entry
table, several times faster than torch's elementwise fp8 cast on CPU; the checkpoint view reads
every stored tensor through `decode` / `dequantize`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .formats import AMAX_FLOOR, INT8, QuantFormat, quant_format

ERROR_ROW_STRIDE = 8  # streaming conversions measure the quantization error on every 8th output row
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DIRECT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # hold every fp8 and int8 code exactly
GATHER_CHUNK = 1 << 16  # table lookups run in chunks of this many codes (the index copy stays in cache)
_BITS = {4: torch.int32, 2: torch.int16}  # an integer dtype of each float width, to move bits through numpy


def _format(fmt: str | QuantFormat) -> QuantFormat:
    return fmt if isinstance(fmt, QuantFormat) else quant_format(fmt)


def code_dtype(fmt: str | QuantFormat) -> torch.dtype:
    """The torch dtype a format's codes are stored as."""
    return getattr(torch, _format(fmt).torch_name)


@functools.cache
def fp8_table(fp8: torch.dtype, dtype: torch.dtype) -> np.ndarray:
    """Each of the 256 bit patterns of `fp8` as the bits of `dtype` (as torch converts them)."""
    return torch.arange(256, dtype=torch.uint8).view(fp8).to(dtype).view(_BITS[dtype.itemsize]).numpy()


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The values of `codes` (fp8 / int8 codes or any stored tensor) as `dtype`, without a scale.

    Written into `out` (contiguous, `dtype`, the codes' shape) when given, else into a new tensor."""
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype)
    if codes.dtype in FP8_DTYPES and dtype in DIRECT_DTYPES:
        table = fp8_table(codes.dtype, dtype)
        src = codes.contiguous().view(torch.uint8).reshape(-1).numpy()
        dst = out.view(_BITS[dtype.itemsize]).view(-1).numpy()
        for i in range(0, src.size, GATHER_CHUNK):
            np.take(table, src[i : i + GATHER_CHUNK], out=dst[i : i + GATHER_CHUNK])
        return out
    return out.copy_(codes)


def along(scale: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """`scale` shaped to broadcast against an `ndim`-D tensor: a scalar, or one value per index of `axis`."""
    if scale.numel() == 1:
        return scale.reshape(())
    if axis is None:
        raise ValueError(f"a per-tensor scale must hold one value, not {scale.numel()}")
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None = None, axis: int | None = 0,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Real values `codes * scale` as `dtype`; `scale` holds one value per index of `axis`, one value, or is None (1).

    fp32, bf16 and fp16 results are computed directly: the codes are exact in each, and torch
    multiplies reduced-precision tensors in fp32 and rounds once, so the result equals the fp32
    product cast to `dtype`.  Written into `out` when given (as `decode`); `codes` is untouched."""
    direct = dtype in DIRECT_DTYPES
    t = decode(codes, dtype if direct else torch.float32, out if direct else None)
    if scale is not None:
        t.mul_(along(scale if scale.dtype in DIRECT_DTYPES else scale.to(torch.float32), t.dim(), axis))
    if direct:
        return t
    return t.to(dtype) if out is None else out.copy_(t)


def _amax(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """max |x| over the tensor ([]) or over every dim but `axis` (kept, size 1), without a temporary |x|."""
    if axis is None:
        return torch.maximum(x.amax(), x.amin().neg())
    dims = tuple(d for d in range(x.dim()) if d != axis % x.dim())
    if not dims:  # one scale per element
        return x.abs()
    return torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())


def _scaled(w: torch.Tensor, f: QuantFormat, axis: int | None, overwrite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / scale as float32, scale) with scale = max(amax, 1e-5) / qmax; one float32 work buffer."""
    x = w if overwrite and w.dtype == torch.float32 and w.is_contiguous() else w.to(torch.float32, copy=True)
    scale = _amax(x, axis).clamp_(min=AMAX_FLOOR).div_(f.qmax)
    return x.div_(scale), scale


def _encode(x: torch.Tensor, f: QuantFormat, keep_x: bool) -> torch.Tensor:
    """Codes of the scaled values `x`: int8 rounds to nearest, then clamps; fp8 clamps, then the cast rounds to nearest even.

    `keep_x=False` lets int8 round `x` in place; fp8 always clamps `x` in place, which for
    `x = w / scale` moves only values a division rounding beyond the range."""
    if f is INT8:
        r = x.round() if keep_x else x.round_()
        return r.clamp_(f.qmin, f.qmax).to(torch.int8)
    return x.clamp_(f.qmin, f.qmax).to(code_dtype(f))


def encode(x: torch.Tensor, fmt: str | QuantFormat) -> torch.Tensor:
    """Codes of values already divided by their scale (`x` is untouched), clamped to the format's range."""
    return _encode(x.to(torch.float32, copy=True), _format(fmt), keep_x=False)


def quantize(w: torch.Tensor, fmt: str | QuantFormat, axis: int | None = 0,
             overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scale) of `w` in `fmt`, one scale per index of `axis` (kept as a size-1-padded shape) or per tensor.

    `overwrite=True` lets a contiguous float32 `w` be used as the work buffer (its values are lost)."""
    f = _format(fmt)
    x, scale = _scaled(w, f, axis, overwrite)
    return _encode(x, f, keep_x=False), scale


@dataclass(frozen=True)
class QuantError:
    """How far a dequantized weight is from the real one."""

    max_abs: float  # max |dequantize(q, scale) - w|
    rel_rms: float  # ||dequantize(q, scale) - w|| / ||w|| (0 for an all-zero w)
    ref_norm: float  # ||w||

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel_rms": self.rel_rms}


def _error(err: torch.Tensor, ref_norm: float) -> QuantError:
    return QuantError(
        max_abs=float(err.abs_().amax()) if err.numel() else 0.0,
        rel_rms=float(torch.linalg.vector_norm(err)) / ref_norm if ref_norm > 0 else 0.0,
        ref_norm=ref_norm,
    )


def quantization_error(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, axis: int | None = 0) -> QuantError:
    """Compare the real weight `w` with `dequantize(codes, scale, axis)`."""
    ref = w.to(torch.float32)
    return _error(dequantize(codes, scale, axis).sub_(ref), float(torch.linalg.vector_norm(ref)))


def quantize_measured(
    w: torch.Tensor, fmt: str | QuantFormat, axis: int | None = 0, overwrite: bool = False, row_stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor, QuantError]:
    """`quantize` plus its error on every `row_stride`-th index of dim 0, measured in code units.

    err = (codes - w/scale) * scale and ||w|| = ||w/scale * scale|| on those rows, so with
    row_stride 1 the figures match `quantization_error` up to one float32 rounding of w/scale;
    a stride > 1 estimates them at a fraction of the cost (max_abs is then over the rows seen).
    """
    f = _format(fmt)
    x, scale = _scaled(w, f, axis, overwrite)
    q = _encode(x, f, keep_x=True)
    rows = slice(None, None, row_stride)
    s = scale[rows] if scale.dim() and scale.shape[0] > 1 else scale
    x_seen = x[rows]
    err = decode(q[rows]).sub_(x_seen).mul_(s)
    ref_norm = float(torch.linalg.vector_norm(x_seen.mul_(s)))
    return q, scale, _error(err, ref_norm)


@dataclass
class QuantErrorSummary:
    """Running summary of the per-tensor errors of a whole conversion."""

    tensors: int = 0
    worst_rel_rms: float = 0.0
    worst_key: str | None = None
    max_abs: float = 0.0
    _sum_sq_err: float = 0.0
    _sum_sq_ref: float = 0.0

    def add(self, key: str, err: QuantError) -> None:
        self.tensors += 1
        self.max_abs = max(self.max_abs, err.max_abs)
        if self.worst_key is None or err.rel_rms > self.worst_rel_rms:
            self.worst_rel_rms, self.worst_key = err.rel_rms, key
        self._sum_sq_ref += err.ref_norm**2
        self._sum_sq_err += (err.rel_rms * err.ref_norm) ** 2

    @property
    def overall_rel_rms(self) -> float:
        return math.sqrt(self._sum_sq_err / self._sum_sq_ref) if self._sum_sq_ref > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {
            "tensors": self.tensors,
            "overall_rel_rms": self.overall_rel_rms,
            "worst_rel_rms": self.worst_rel_rms,
            "worst_key": self.worst_key,
            "max_abs": self.max_abs,
        }
