"""How each checkpoint layout stores a DiT expert's tensors: one table, read by the tiny writer,
`convert` and the checkpoint view (torch-free; dtypes by name, as in checkpoint headers).

Facts (shared/reference/lightx2v-formats.md §1, peer-formats.md §2, LightX2V
`tools/convert/converter.py::quantize_model` and `tools/convert/quant/quant.py`):
- `official`: every tensor fp32 (the Wan-AI releases), official names.
- `diffusers`: every tensor fp32, `WanTransformer3DModel` names.
- `lightx2v`: official names; the block linears (2-D `self_attn`/`cross_attn`/`ffn` weights, in VACE's
  `vace_blocks.N.` too with their `before_proj`/`after_proj`) as
  fp8 e4m3 or int8 codes with `<layer>.weight_scale` [out, 1] (one scale per output channel),
  every other tensor bf16 (`--non_linear_dtype torch.bfloat16`).  LightX2V's converter keeps a
  scale in its source weight's dtype: fp32 from the official release, so fp32 here.
- `comfyui` (LightX2V `--comfyui_mode`, ComfyUI's scaled fp8): as `lightx2v`, but one fp32 scalar
  `<layer>.scale_weight` per tensor, plus the marker `scaled_fp8` = fp8 e4m3 zeros(2) (ComfyUI
  takes the weights' fp8 dtype from it; two elements: no fp8 matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

from wanrt.calibration.formats import FORMATS

from .variants import BLOCK_LISTS

# Stored dtypes that hold codes (real value = code * scale), and those a scale may be stored in.
QUANTIZED_DTYPES = ("fp8_e4m3", "fp8_e5m2", "int8")
SCALE_DTYPES = ("fp32", "bf16", "fp16")
# The block linears LightX2V quantizes (and whose storage dtype names an expert's precision).
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
)  # fmt: skip
BLOCK_LINEAR_SUFFIXES = tuple(f".{m}.weight" for m in BLOCK_LINEARS)
# Lists of Wan attention blocks -> the linear weight suffixes inside them (a variant's blocks add linears:
# VACE's before_proj / after_proj, which LightX2V's VACE loader reads in the quantized scheme too).
BLOCK_LIST_LINEARS: dict[str, tuple[str, ...]] = {
    "blocks.": BLOCK_LINEAR_SUFFIXES,
    **{f"{b.name}.": BLOCK_LINEAR_SUFFIXES + tuple(f".{m}.weight" for m in b.linears) for b in BLOCK_LISTS},
}


def is_block_linear(key: str) -> bool:
    """True for an official key naming a block linear weight (the ones fp8/int8 files quantize), VACE blocks' too."""
    head = key[: key.find(".") + 1]
    suffixes = BLOCK_LIST_LINEARS.get(head)
    return suffixes is not None and key.endswith(suffixes)


# Wan2.2-Animate's face adapter linears: LightX2V's `wan_animate_dit` mode quantizes them too.
FACE_ADAPTER_LINEAR_SUFFIXES = (".linear1_kv.weight", ".linear1_q.weight", ".linear2.weight")


def is_face_adapter_linear(key: str) -> bool:
    """True for an official key naming a face adapter linear weight (Wan2.2-Animate)."""
    return key.startswith("face_adapter.fuser_blocks.") and key.endswith(FACE_ADAPTER_LINEAR_SUFFIXES)


def quantizable(key: str, shape: tuple[int, ...]) -> bool:
    """True for the tensors a quantized layout stores as codes: 2-D block (and face adapter) linear weights."""
    return (is_block_linear(key) or is_face_adapter_linear(key)) and len(shape) == 2


@dataclass(frozen=True)
class StoredTensor:
    """One tensor in a file: key, dtype name and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ScaleRule:
    """How a layout stores the scale of a quantized weight `<layer>.weight`."""

    suffix: str  # the scale's key is `<layer>` + suffix
    axis: int | None  # 0: one scale per output channel; None: one per tensor
    dtype: str = "fp32"

    @property
    def granularity(self) -> str:
        return "per_tensor" if self.axis is None else "per_channel"

    def stored(self, weight_key: str, weight_shape: tuple[int, ...]) -> StoredTensor:
        """The scale tensor of weight `weight_key` (shaped to broadcast against it, or a scalar)."""
        shape = () if self.axis is None else tuple(n if d == self.axis else 1 for d, n in enumerate(weight_shape))
        return StoredTensor(weight_key.removesuffix(".weight") + self.suffix, self.dtype, shape)


@dataclass(frozen=True)
class TensorStorage:
    """How one tensor is stored: its own entry and, for fp8/int8 codes, its format and scale."""

    tensor: StoredTensor
    fmt: str | None = None  # "fp8" / "int8" when stored as codes
    scale: StoredTensor | None = None
    axis: int | None = None  # the scale's axis (None: per tensor)

    @property
    def entries(self) -> list[StoredTensor]:
        """What the file holds for this tensor, in writing order."""
        return [self.tensor] + ([self.scale] if self.scale else [])


@dataclass(frozen=True)
class Layout:
    """One on-disk layout of a DiT expert."""

    name: str
    float_dtype: str  # dtype of every tensor not stored as codes
    names: str = "official"  # key naming: "official" or "diffusers"
    formats: tuple[str, ...] = ()  # the code formats it stores block linears in
    scale: ScaleRule | None = None
    marker: StoredTensor | None = None  # a tensor of zeros that marks the layout

    def store(self, key: str, shape: tuple[int, ...], fmt: str | None = None) -> TensorStorage:
        """How this layout stores tensor `key` of `shape`, as `fmt` codes (with a scale) or, for None, as float."""
        shape = tuple(shape)
        if fmt is None:
            return TensorStorage(StoredTensor(key, self.float_dtype, shape))
        if fmt not in self.formats or self.scale is None:
            raise ValueError(f"the {self.name} layout stores no {fmt} weights (it stores {', '.join(self.formats) or 'none'})")
        code = StoredTensor(key, FORMATS[fmt].dtype, shape)
        return TensorStorage(code, fmt, self.scale.stored(key, shape), self.scale.axis)

    @property
    def markers(self) -> list[StoredTensor]:
        return [self.marker] if self.marker else []


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("official", "fp32"),
        Layout("diffusers", "fp32", names="diffusers"),
        Layout("lightx2v", "bf16", formats=("fp8", "int8"), scale=ScaleRule(".weight_scale", axis=0)),
        Layout("comfyui", "bf16", formats=("fp8",), scale=ScaleRule(".scale_weight", axis=None),
               marker=StoredTensor("scaled_fp8", "fp8_e4m3", (2,))),
    )
}  # fmt: skip
SCALE_RULES = [layout.scale for layout in LAYOUTS.values() if layout.scale]
# Scale companions of a weight `<layer>.weight`, in order of preference; a scale layout name -> its axis.
WEIGHT_SCALE_SUFFIXES = tuple(rule.suffix for rule in SCALE_RULES)
SCALE_AXES: dict[str, int | None] = {rule.granularity: rule.axis for rule in SCALE_RULES}


def scale_granularity(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str | None:
    """How a stored scale of `scale_shape` applies to a weight: "per_tensor", "per_channel" ([out, 1] or [out]) or None (neither)."""
    if all(n == 1 for n in scale_shape):
        return "per_tensor"
    if weight_shape and tuple(scale_shape) in ((weight_shape[0], 1), (weight_shape[0],)):
        return "per_channel"
    return None
