"""The 8-bit formats weights are quantized to: code dtype, representable range, scale rule.

Torch-free, so that checkpoint headers (read without torch) can name them.  Facts
(shared/reference/lightx2v-formats.md §1, LightX2V `tools/convert/quant/quant.py`): symmetric,
`scale = max(amax(|w|), 1e-5) / qmax` with qmax the largest code (`torch.finfo(float8_e4m3fn).max`
= 448, int8 127); fp8 e4m3 codes are `w / scale` clipped to ±448 and rounded to nearest, int8
codes are `round(w / scale)` clamped to [-128, 127].
"""

from __future__ import annotations

from dataclasses import dataclass

from wanrt.engines.errors import WanrtError

AMAX_FLOOR = 1e-5  # LightX2V clamps amax so that an all-zero channel gets a finite scale


@dataclass(frozen=True)
class QuantFormat:
    """One code format: its name, the dtype its codes are stored as, and the code range."""

    name: str  # "fp8" / "int8", as the CLI and the reports say it
    dtype: str  # storage dtype name, as in checkpoint headers ("fp8_e4m3", "int8")
    torch_name: str  # attribute of the torch dtype ("float8_e4m3fn", "int8")
    qmin: float  # smallest code
    qmax: float  # largest code: the scale maps amax onto it


FP8_E4M3 = QuantFormat("fp8", "fp8_e4m3", "float8_e4m3fn", -448.0, 448.0)
INT8 = QuantFormat("int8", "int8", "int8", -128.0, 127.0)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (FP8_E4M3, INT8)}
FORMAT_OF_DTYPE: dict[str, str] = {f.dtype: f.name for f in FORMATS.values()}  # "fp8_e4m3" -> "fp8"


def quant_format(name: str) -> QuantFormat:
    """The format called `name` ("fp8" or "int8")."""
    try:
        return FORMATS[name]
    except KeyError:
        raise WanrtError(f"unknown weight quantization {name!r}; expected one of {', '.join(FORMATS)}") from None
