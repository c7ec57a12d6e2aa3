"""Weight quantization in the layouts LightX2V and ComfyUI store on disk.

- LightX2V (`tools/convert/quant/quant.py`): per output channel, `scale = amax(|w|, dim=1).clamp(1e-5) / qmax`
  stored as `<layer>.weight_scale` `[out, 1]`; fp8 e4m3 rounds to nearest (qmax 448), int8 rounds to
  nearest and clamps to [-128, 127] (qmax 127).
- ComfyUI scaled fp8: one scale per tensor, `amax(|w|) / 448`, stored as `<layer>.scale_weight` (a scalar).

Every function takes a real-valued weight (any float dtype; the math runs in fp32) and returns
`(q, scale)` with `scale` float32; `dequantize(q, scale) = q * scale` undoes it up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wanrt.engines.errors import WanrtError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
AMAX_FLOOR = 1e-5  # LightX2V clamps amax so all-zero rows get a finite scale
ERROR_ROW_STRIDE = 8  # streaming conversions measure the quantization error on every 8th output row

# format -> (storage dtype, largest representable magnitude)
FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "fp8": (torch.float8_e4m3fn, FP8_MAX),
    "int8": (torch.int8, INT8_MAX),
}
LAYOUTS = ("per_channel", "per_tensor")
# storage dtype name (as in export.checkpoint.safetensors_file) -> format
STORAGE_TO_FORMAT = {"fp8_e4m3": "fp8", "int8": "int8"}


# float32 value of each of the 256 float8_e4m3fn bit patterns (a table lookup is several times
# faster than torch's elementwise fp8 -> fp32 cast on CPU)
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def codes_to_float(q: torch.Tensor) -> torch.Tensor:
    """fp8 / int8 codes as a new float32 tensor (no scale applied)."""
    if q.dtype == torch.float8_e4m3fn:
        return _FP8_VALUES.take(q.view(torch.uint8).to(torch.int64))
    return q.to(torch.float32)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as [out, -1] (a view)."""
    return x.reshape(x.shape[0], -1)


def _amax(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max |x| per output channel ([out, 1]) or over the tensor ([]), without a temporary |x|."""
    if per_channel:
        rows = _rows(x)
        return torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    return torch.maximum(x.amax(), x.amin().neg())


def _broadcast(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-channel [out, 1] or scalar scale shaped to broadcast against `w`."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(w.shape[0], *([1] * (w.dim() - 1)))


def _scaled(w: torch.Tensor, fmt: str, per_channel: bool, overwrite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / scale as float32, scale) with scale = max(amax, 1e-5) / qmax; one float32 work buffer."""
    x = w if overwrite and w.dtype == torch.float32 and w.is_contiguous() else w.to(torch.float32, copy=True)
    scale = _amax(x, per_channel).clamp_(min=AMAX_FLOOR).div_(FORMATS[fmt][1])
    return x.div_(_broadcast(scale, x)), scale


def _encode(x: torch.Tensor, fmt: str, keep: bool) -> torch.Tensor:
    """Codes of the scaled weight `x`: fp8 rounds to nearest even in the cast, int8 rounds then clamps.

    `keep=False` lets int8 round `x` in place; fp8 only clamps `x` (by at most a division rounding).
    """
    if fmt == "int8":
        r = x.round() if keep else x.round_()
        return r.clamp_(-128, 127).to(torch.int8)
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _quantize(w: torch.Tensor, fmt: str, per_channel: bool, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x, scale = _scaled(w, fmt, per_channel, overwrite)
    return _encode(x, fmt, keep=False), scale


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V scaled fp8: float8_e4m3fn weight and a float32 [out, 1] scale (amax/448)."""
    return _quantize(w, "fp8", per_channel=True)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V int8: round-to-nearest int8 weight and a float32 [out, 1] scale (amax/127)."""
    return _quantize(w, "int8", per_channel=True)


def quantize_fp8_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI scaled fp8: float8_e4m3fn weight and one float32 scalar scale (amax/448)."""
    return _quantize(w, "fp8", per_channel=False)


def quantize_int8_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor int8 (LightX2V's `--comfyui_mode` int8): one float32 scalar scale (amax/127)."""
    return _quantize(w, "int8", per_channel=False)


def _check(fmt: str, layout: str) -> None:
    if fmt not in FORMATS or layout not in LAYOUTS:
        raise WanrtError(
            f"unknown weight quantization {fmt!r}/{layout!r}; expected format one of {sorted(FORMATS)}"
            f" and layout one of {list(LAYOUTS)}"
        )


def quantize_weight(
    w: torch.Tensor, fmt: str, layout: str = "per_channel", overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` to `fmt` ("fp8" or "int8") with `layout` ("per_channel" or "per_tensor") scales.

    `overwrite=True` lets a contiguous float32 `w` be used as the work buffer (its values are lost).
    """
    _check(fmt, layout)
    return _quantize(w, fmt, layout == "per_channel", overwrite)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`q * scale` in float32, for a per-channel ([out, 1] or [out]) or scalar scale."""
    return codes_to_float(q).mul_(_broadcast(scale.to(torch.float32), q))


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


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> QuantError:
    """Compare the real weight `w` with `dequantize(q, scale)`."""
    ref = w.to(torch.float32)
    return _error(dequantize(q, scale).sub_(ref), float(torch.linalg.vector_norm(ref)))


def quantize_measured(
    w: torch.Tensor, fmt: str, layout: str = "per_channel", overwrite: bool = False, row_stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor, QuantError]:
    """`quantize_weight` plus its error on every `row_stride`-th output row, measured in code units.

    err = (codes - w/scale) * scale and ||w|| = ||w/scale * scale|| on those rows, so with
    row_stride 1 the figures match `quantization_error` up to one float32 rounding of w/scale;
    a stride > 1 estimates them at a fraction of the cost (max_abs is then over the rows seen).
    """
    _check(fmt, layout)
    x, scale = _scaled(w, fmt, layout == "per_channel", overwrite)
    q = _encode(x, fmt, keep=True)
    rows = slice(None, None, row_stride)
    s = _broadcast(scale, x)
    s = s[rows] if s.dim() else s
    x_seen = x[rows]
    err = codes_to_float(q[rows]).sub_(x_seen).mul_(s)
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
