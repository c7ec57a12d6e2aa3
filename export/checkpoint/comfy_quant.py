"""ComfyUI's per-layer quantization descriptions (`comfy_quant`): the formats read here, and a clear refusal of the rest.

How ComfyUI stores them (Comfy-Org/ComfyUI `comfy/ops.py` `_quantized_weight_state_dict` and
`_load_quantized_module`, `comfy/quant_ops.py` `QUANT_ALGOS`, `comfy/utils.py` `convert_old_quants`):
- `<layer>.comfy_quant`: a 1-D uint8 tensor holding UTF-8 JSON, `{"format": "<name>", ...}` (optional
  `full_precision_matrix_mult`, `group_size`, `convrot`, `convrot_groupsize`, `params`, ...);
- or, file-wide, the safetensors metadata `_quantization_metadata` = `{"layers": {"<layer>": {...}}}`,
  which ComfyUI turns into those tensors at load time.
- formats: `float8_e4m3fn` / `float8_e5m2` (fp8 weight, one fp32 `weight_scale`, optional `input_scale`),
  `nvfp4` (uint8 weight of packed e2m1 pairs, fp8 e4m3 `weight_scale` per 16 values, fp32 `weight_scale_2`),
  `mxfp8` (fp8 e4m3 weight, e8m0 `weight_scale` per 32 values), `int8_tensorwise` (int8 weight, `weight_scale`;
  with `convrot` the weight is Hadamard-rotated), `convrot_w4a4`, `asym_w4a8_int8`.

Read here: `float8_e4m3fn` and plain `int8_tensorwise` (weight times its `weight_scale`, as the older
`scaled_fp8` files).  Any other format is an error naming the format and the layer, before its
packed weights or block scales can surface as a confusing shape or dtype error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wanrt.engines.errors import CheckpointError
from wanrt.engines.schema import JsonLimits, load_json

if TYPE_CHECKING:
    from .view import TensorSource

SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
READ_FORMATS = ("float8_e4m3fn", "int8_tensorwise")
DESCRIPTION_LIMITS = JsonLimits(max_bytes=1 << 20, max_depth=8)  # one layer's description, or the file's table of them


def _json(raw: bytes | str, where: str) -> dict[str, Any]:
    value = load_json(raw, f"{where} is not a JSON description", CheckpointError, DESCRIPTION_LIMITS)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    return value


def layer_descriptions(source: "TensorSource") -> dict[str, dict[str, Any]]:
    """Layer name (as stored, without `.comfy_quant`) -> its ComfyUI quantization description."""
    layers: dict[str, dict[str, Any]] = {}
    meta = source.metadata.get(METADATA_KEY)
    if meta is not None:
        table = _json(meta, f"{source.path}: metadata {METADATA_KEY!r}").get("layers", {})
        layers.update({str(k): v for k, v in table.items() if isinstance(v, dict)} if isinstance(table, dict) else {})
    for key in source.keys():
        if key.endswith(SUFFIX):
            layers[key[: -len(SUFFIX)]] = _json(source.read_bytes(key), f"{source.path}: {key!r}")
    return layers


def readable(description: dict[str, Any]) -> bool:
    """True for the formats the checkpoint view dequantizes as stored weight times its scale."""
    params = description.get("params") if isinstance(description.get("params"), dict) else {}
    rotated = bool(description.get("convrot") or params.get("convrot"))
    return description.get("format") in READ_FORMATS and not rotated


def check_layers(source: "TensorSource") -> None:
    """Raise for the first layer quantized in a ComfyUI format not read here, naming the format and the layer."""
    for layer, description in layer_descriptions(source).items():
        if not readable(description):
            fmt = description.get("format")
            rotated = " with convrot (Hadamard-rotated weights)" if fmt in READ_FORMATS else ""
            raise CheckpointError(
                f"{source.path}: layer {layer!r} is quantized in ComfyUI's {fmt!r} format{rotated} (its comfy_quant);"
                f" wanrt reads {' and '.join(READ_FORMATS)} layers: use a bf16, LightX2V fp8/int8 or float8_e4m3fn file"
            )
