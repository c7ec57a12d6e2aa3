"""LightX2V's fp8 / int8 T5 and CLIP files (its converter's `wan_t5` / `wan_clip` modes) as encoder sources.

Facts (LightX2V `tools/convert/converter.py::quantize_model` and its `model_type_keys_map`,
`tools/convert/quant/quant.py`; loaders `lightx2v/models/input_encoders/hf/wan/t5/model.py`,
`.../xlm_roberta/model.py`, `.../hf/q_linear.py`; selection `lightx2v/models/runners/wan/wan_runner.py`
and `lightx2v/utils/utils.py::find_torch_model_path`):

- `wan_t5` quantizes every 2-D tensor whose `key.split(".")[2]` is `attn` or `ffn` (the official
  keys `blocks.N.attn.{q,k,v,o}.weight`, `blocks.N.ffn.{gate.0,fc1,fc2}.weight`); `wan_clip` those
  whose part 3 is `attn` or `mlp` (`visual.transformer.N.attn.{to_qkv,proj}.weight`,
  `visual.transformer.N.mlp.{0,2}.weight`) and drops every `textual` key.  Embeddings, norms,
  biases and the relative position tables are not quantized: they are cast to `--non_linear_dtype`
  (fp32 by default, or bf16 / fp16).
- A quantized weight keeps its key and holds int8 or float8_e4m3fn codes [out, in]; its scale is
  `key + "_scale"` = `<layer>.weight_scale` [out, 1] (one per output channel, symmetric:
  amax / 127 or amax / 448), in the source weight's dtype (bf16 from the official T5, fp16 from
  the official CLIP).  The loaders' quantized linears hold `weight` and `weight_scale` [out, 1]
  fp32 buffers filled by `load_state_dict`.
- Selection: `t5_quantized: true` needs `t5_quant_scheme`; the file is `t5_quantized_ckpt`, else
  `models_t5_umt5-xxl-enc-{scheme.split("-")[0]}.pth` under `model_path` (the subfolders
  distill_int8, distill_fp8, distill_models, int8, fp8, original are tried first, in that order,
  then `model_path` itself).  CLIP the same with `clip_*` and
  `models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fmt}.pth`.  Without `t5_quantized` the
  quantized keys are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanrt.calibration.formats import FORMAT_OF_DTYPE, FORMATS
from wanrt.engines.errors import CheckpointError

from .safetensors_file import TensorHeader
from .storage import QUANTIZED_DTYPES, SCALE_DTYPES, scale_granularity
from .view import TensorRef, TensorSource

if TYPE_CHECKING:
    import torch

SCALE_SUFFIX = "_scale"  # the converter's `key + "_scale"`
# find_torch_model_path's search: model_path/<sub>/name for these (each inserted at the front, so tried in
# reverse), then model_path/name.
LIGHTX2V_SEARCH_SUBDIRS = ("distill_int8", "distill_fp8", "distill_models", "int8", "fp8", "original")


@dataclass(frozen=True)
class EncoderQuantRule:
    """What LightX2V's converter quantizes in one encoder, and how its runner finds the file."""

    kind: str  # "t5" / "clip", as `companions.Companion.kind`
    key_idx: int  # the converter's `key_idx`: which part of the key names the module
    targets: tuple[str, ...]  # the converter's `target_keys`
    dropped: str | None  # the converter's `ignore_key` (keys holding it are not written)
    file_name: str  # default file name, formatted with the scheme's format ("int8" / "fp8")
    schemes: tuple[str, ...]  # the `*_quant_scheme` values its loader accepts
    converter_mode: str

    @property
    def config_keys(self) -> tuple[str, str, str]:
        """(`<kind>_quantized`, `<kind>_quant_scheme`, `<kind>_quantized_ckpt`)."""
        return f"{self.kind}_quantized", f"{self.kind}_quant_scheme", f"{self.kind}_quantized_ckpt"

    def quantizes(self, key: str) -> bool:
        """True for a weight key the converter stores as codes (given a 2-D tensor)."""
        parts = key.split(".")
        return key.endswith(".weight") and len(parts) > self.key_idx + 1 and parts[self.key_idx] in self.targets


_LOADER_SCHEMES = ("int8", "int8-vllm", "fp8", "fp8-sgl", "fp8-vllm", "int8-torchao", "fp8-torchao", "int8-q8f",
                   "fp8-q8f", "int8-triton", "fp8-triton", "int8-tmo", "int8-iluvatar")  # fmt: skip
RULES: dict[str, EncoderQuantRule] = {
    "t5": EncoderQuantRule("t5", 2, ("attn", "ffn"), None, "models_t5_umt5-xxl-enc-{fmt}.pth",
                           _LOADER_SCHEMES + ("int8-npu",), "wan_t5"),
    "clip": EncoderQuantRule("clip", 3, ("attn", "mlp"), "textual",
                             "models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fmt}.pth", _LOADER_SCHEMES, "wan_clip"),
}  # fmt: skip


def is_t5_linear(key: str) -> bool:
    """True for an official umt5 key naming a block linear weight (attention q/k/v/o, FFN gate.0/fc1/fc2)."""
    return RULES["t5"].quantizes(key)


def scheme_format(scheme: str) -> str:
    """"int8" / "fp8" of a LightX2V scheme name (`int8-vllm` -> `int8`), as its runner forms file names."""
    return scheme.split("-")[0]


class ScaledSource(TensorSource):
    """A companion file's tensors with LightX2V's `<key>_scale` folded in: codes read back as real values.

    Also a mapping of key -> `TensorRef` (`self[key]`, `load`) for the weight Q/DQ pass, which passes
    the stored codes and scales through when they are in the requested format."""

    def __init__(self, source: TensorSource):
        self.inner, self.path, self.metadata = source, source.path, source.metadata
        stored = source.keys()
        present = set(stored)
        self.refs: dict[str, TensorRef] = {}
        for key in stored:
            if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) in present:
                continue
            h = source.header(key)
            scale_key = key + SCALE_SUFFIX
            if h.dtype not in QUANTIZED_DTYPES or scale_key not in present:
                self.refs[key] = TensorRef(key, source, key, h.dtype, tuple(h.shape))
                continue
            sh = source.header(scale_key)
            layout = scale_granularity(tuple(h.shape), tuple(sh.shape))
            if sh.dtype not in SCALE_DTYPES or layout is None:
                raise CheckpointError(
                    f"{self.path}: scale {scale_key!r} is {sh.dtype} {list(sh.shape)}; expected fp32, bf16 or fp16"
                    f" [{h.shape[0]}, 1] (one per output channel) or a scalar for {key!r} {list(h.shape)}"
                )
            self.refs[key] = TensorRef(key, source, key, h.dtype, tuple(h.shape), source, scale_key, layout)

    def keys(self) -> list[str]:
        return list(self.refs)

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def __getitem__(self, key: str) -> TensorRef:
        try:
            return self.refs[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def header(self, key: str) -> TensorHeader:
        self[key]
        return self.inner.header(key)

    def read(self, key: str) -> "torch.Tensor":
        ref = self[key]
        return ref.load() if ref.quantized else self.inner.read(key)

    def load(self, key: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        return self[key].load(dtype)


def holds_scales(source: TensorSource) -> bool:
    """True when some tensor of `source` has a `<key>_scale` companion (LightX2V's quantized layout)."""
    keys = set(source.keys())
    return any(k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in keys for k in keys)


def weight_view(source: TensorSource) -> ScaledSource:
    """`source` as key -> TensorRef (for the weight Q/DQ pass); a ScaledSource is returned as is."""
    return source if isinstance(source, ScaledSource) else ScaledSource(source)


def stored_format(dtypes: dict[str, str], kind: str) -> str | None:
    """"int8" / "fp8" when an encoder's linears are stored as codes (by the first one), else None."""
    rule = RULES[kind]
    first = next((d for k, d in dtypes.items() if rule.quantizes(k)), None)
    return FORMAT_OF_DTYPE.get(first) if first in QUANTIZED_DTYPES else None


def check_quantized_file(source: TensorSource, kind: str, scheme: str, where: str) -> None:
    """Every linear LightX2V's converter quantizes is stored as `scheme`'s codes with a per-channel `_scale`.

    `where` names the config key that chose the file (for the message)."""
    rule = RULES[kind]
    fmt = FORMATS[scheme_format(scheme)]
    view = weight_view(source)
    linears = [r for k, r in view.refs.items() if rule.quantizes(k) and len(r.shape) == 2]
    if not linears:
        raise CheckpointError(f"{source.path}: holds no {kind.upper()} linear weights ({where})")
    for ref in linears:
        problem = None
        if ref.dtype != fmt.dtype:
            problem = f"is stored as {ref.dtype}"
        elif ref.scale_layout != "per_channel":
            problem = f"has no per-channel {ref.key + SCALE_SUFFIX!r} [{ref.shape[0]}, 1]"
        if problem:
            raise CheckpointError(
                f"{source.path}: {ref.key!r} {problem}; {where} expects {fmt.dtype} codes with a per-channel"
                f" {SCALE_SUFFIX} [out, 1], as LightX2V's converter writes them (-t {rule.converter_mode} --quantized"
                f" --linear_type {fmt.name})"
            )


def check_scheme(config: dict[str, Any], kind: str, config_path: Path) -> str:
    """The `<kind>_quant_scheme` of a config with `<kind>_quantized` on (validated)."""
    rule = RULES[kind]
    _, scheme_key, _ = rule.config_keys
    scheme = config.get(scheme_key)
    if scheme not in rule.schemes:
        raise CheckpointError(f"{config_path}: {rule.config_keys[0]} is true but {scheme_key} is {scheme!r};"
                              f" expected one of {', '.join(rule.schemes)}")  # fmt: skip
    return scheme


def default_file(kind: str, scheme: str, roots: list[Path]) -> Path | None:
    """LightX2V's default quantized file of an encoder under the model roots (`find_torch_model_path`), or None."""
    name = RULES[kind].file_name.format(fmt=scheme_format(scheme))
    for root in roots:
        for folder in (*(root / s for s in LIGHTX2V_SEARCH_SUBDIRS), root):
            if (folder / name).is_file():
                return folder / name
    return None
