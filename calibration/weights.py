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

from engines.errors import WanrtError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
AMAX_FLOOR = 1e-5  # LightX2V clamps amax so all-zero rows get a finite scale

# format -> (storage dtype, largest representable magnitude)
FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "fp8": (torch.float8_e4m3fn, FP8_MAX),
    "int8": (torch.int8, INT8_MAX),
}
LAYOUTS = ("per_channel", "per_tensor")
# storage dtype name (as in export.checkpoint.safetensors_file) -> format
STORAGE_TO_FORMAT = {"fp8_e4m3": "fp8", "int8": "int8"}


def _amax_per_channel(w: torch.Tensor) -> torch.Tensor:
    """amax(|w|) over every dim but the first, shaped [out, 1], float32."""
    return w.reshape(w.shape[0], -1).abs().amax(dim=1, keepdim=True).to(torch.float32)


def _amax_per_tensor(w: torch.Tensor) -> torch.Tensor:
    """amax(|w|) as a float32 scalar tensor (shape [])."""
    return w.abs().amax().to(torch.float32)


def _broadcast(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-channel [out, 1] or scalar scale shaped to broadcast against `w`."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(w.shape[0], *([1] * (w.dim() - 1)))


def _quantize(w: torch.Tensor, fmt: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = max(amax, 1e-5) / qmax (per output channel or per tensor); codes = round-to-nearest(w / scale)."""
    dtype, qmax = FORMATS[fmt]
    amax = _amax_per_channel(w) if per_channel else _amax_per_tensor(w)
    scale = amax.clamp_(min=AMAX_FLOOR) / qmax
    x = w.to(torch.float32) / _broadcast(scale, w)
    if fmt == "int8":
        return x.round_().clamp_(-128, 127).to(dtype), scale
    return x.clamp_(-qmax, qmax).to(dtype), scale  # the fp8 cast rounds to nearest even


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


def quantize_weight(w: torch.Tensor, fmt: str, layout: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w` to `fmt` ("fp8" or "int8") with `layout` ("per_channel" or "per_tensor") scales."""
    if fmt not in FORMATS or layout not in LAYOUTS:
        raise WanrtError(
            f"unknown weight quantization {fmt!r}/{layout!r}; expected format one of {sorted(FORMATS)}"
            f" and layout one of {list(LAYOUTS)}"
        )
    return _quantize(w, fmt, per_channel=layout == "per_channel")


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`q * scale` in float32, for a per-channel ([out, 1] or [out]) or scalar scale."""
    return q.to(torch.float32) * _broadcast(scale.to(torch.float32), q)


@dataclass(frozen=True)
class QuantError:
    """How far a dequantized weight is from the real one."""

    max_abs: float  # max |dequantize(q, scale) - w|
    rel_rms: float  # ||dequantize(q, scale) - w|| / ||w|| (0 for an all-zero w)
    ref_norm: float  # ||w||

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel_rms": self.rel_rms}


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> QuantError:
    """Compare the real weight `w` with `dequantize(q, scale)`."""
    ref = w.to(torch.float32)
    err = dequantize(q, scale).sub_(ref)
    norm = float(torch.linalg.vector_norm(ref))
    return QuantError(
        max_abs=float(err.abs().amax()) if err.numel() else 0.0,
        rel_rms=float(torch.linalg.vector_norm(err)) / norm if norm > 0 else 0.0,
        ref_norm=norm,
    )


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
