"""Explicit Q/DQ graphs for the DiT block linears: int8 / fp8 weights, calibrated activation scales.

Every linear inside a DiT block (`export.checkpoint.storage.BLOCK_LINEARS`: self/cross attention
q/k/v/o, the image-branch k/v, both FFN linears) is exported as `MatMul(x, Transpose(W))`.  The
weight pass (`weight_qdq_pass`, an export graph pass) replaces `Transpose(W)` by

    W codes [K, N] (int8 / float8e4m3fn initializer) -> DequantizeLinear(scale [N], zero 0, axis=1) -> MatMul B

one symmetric scale per output channel, on axis 1 of B [K, N]: ONNX Runtime's int8 kernels need
exactly that axis and fail on axis 0 (compiled-path-facts.md, "Quantized graphs").  The codes are
the transpose of the checkpoint's [N, K] codes: a LightX2V / ComfyUI file whose codes are already in
the requested format passes them (and its scales) through unchanged; anything else is quantized
from its real values (`calibration.quant.quantize`, axis 0 of [N, K]).  Everything outside the
block linears keeps its precision.

W8A8 graphs then get one static per-tensor scale for each quantized MatMul's input
(`insert_activation_qdq`, on the saved graph after calibration):

    x -> QuantizeLinear(s, zero 0) -> DequantizeLinear(s, zero 0) -> MatMul A

Each MatMul gets its own pair (q/k/v of one attention read one tensor, each through its own Q/DQ).
The residual stream itself is never quantized: a DQ output feeds only MatMuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import helper, numpy_helper

from wanrt.calibration.formats import AMAX_FLOOR, FORMAT_OF_DTYPE, QuantFormat, quant_format
from wanrt.calibration.quant import quantize
from wanrt.engines.errors import WanrtError
from wanrt.export.checkpoint.storage import SCALE_AXES, is_block_linear
from wanrt.export.onnx.ir_tensors import torch_to_ir_tensor

SCHEMES = ("int8", "fp8")
WEIGHT_AXIS = 1  # per output channel of MatMul's B [K, N]
SCALE_SUFFIX = "_scale"  # `<key>_scale`: a weight's per-channel scale initializer
ZERO_SUFFIX = "_zero_point"
INPUT_SCALE_SUFFIX = ".input_scale"  # `<layer>.input_scale`: the static scale of a linear's input
_ONNX_CODE_TYPES = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}
_IR_CODE_TYPES = {"int8": ir.DataType.INT8, "fp8": ir.DataType.FLOAT8E4M3FN}
_TORCH_SCALE = {ir.DataType.FLOAT: torch.float32, ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.FLOAT16: torch.float16}


class QuantizeError(WanrtError):
    """A graph or a source that cannot be quantized as asked."""


def check_scheme(scheme: str) -> QuantFormat:
    """The code format of `--quantize SCHEME`."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"--quantize {scheme!r}: expected one of {', '.join(SCHEMES)}")
    return quant_format(scheme)


def layer_of(weight_key: str) -> str:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.self_attn.q`."""
    return weight_key.removesuffix(".weight")


# --------------------------------------------------------------------------------------------
# where the codes come from


def source_of_codes(ref: Any, scheme: str) -> str:
    """How a weight's codes are made: "passthrough" (the file's own codes and scales), "requantize" or "quantize"."""
    stored = FORMAT_OF_DTYPE.get(getattr(ref, "dtype", ""))
    if stored is None:
        return "quantize"  # float weights
    if stored == scheme and not getattr(ref, "patches", ()):
        return "passthrough"
    return "requantize"  # another format, or a LoRA merged into the codes


def weight_codes(view: Mapping[str, Any], key: str, scheme: str,
                 scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(codes [K, N] in `scheme`, scale [N] in `scale_dtype`) of the weight `view[key]` ([N, K]).

    Passthrough keeps the file's codes bit for bit (transposed) and its scales (a per-tensor
    scale repeated per channel); otherwise the real values (LoRAs merged) are quantized per
    output channel."""
    fmt = check_scheme(scheme)
    ref = view[key]
    rows = ref.shape[0]
    how = source_of_codes(ref, scheme)
    if how == "passthrough":
        codes, scale = ref.load_stored()
        if scale is None:
            scale = torch.ones(rows)
        elif SCALE_AXES.get(ref.scale_layout) is None:
            scale = scale.reshape(()).expand(rows)
    else:
        # a LoRA merged into codes: its merged real values (not requantized-then-dequantized first)
        w = ref.merged_fp32() if getattr(ref, "patches", ()) else view.load(key, torch.float32)
        codes, scale = quantize(w, fmt, axis=0)  # not in place: a view may hand out its own tensor
    return codes.t().contiguous(), scale.reshape(rows).to(scale_dtype)


class _WeightLoader:
    """Computes one weight's (codes, scale) for the two initializers that hold them, reading the weight once.

    Whichever is asked first computes both; the other is kept until asked for (codes are dropped
    once written, the small scale is kept); a second request for the codes computes them again."""

    def __init__(self, view: Mapping[str, Any], key: str, scheme: str, scale_dtype: torch.dtype):
        self.view, self.key, self.scheme, self.scale_dtype = view, key, scheme, scale_dtype
        self._codes: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scale = weight_codes(self.view, self.key, self.scheme, self.scale_dtype)
        if self._scale is None:
            self._scale = scale
        return codes, scale

    def codes(self) -> ir.Tensor:
        codes, self._codes = self._codes, None
        if codes is None:
            codes, _ = self._compute()
        return torch_to_ir_tensor(codes, self.key)

    def scale(self) -> ir.Tensor:
        if self._scale is None:
            self._codes, _ = self._compute()
        return torch_to_ir_tensor(self._scale, self.key + SCALE_SUFFIX)


# --------------------------------------------------------------------------------------------
# the weight pass (export time, onnx_ir)


@dataclass
class WeightQuantReport:
    """What the weight pass did: how many linears, and where their codes came from."""

    scheme: str
    layers: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # passthrough / requantize / quantize -> count

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "layers": len(self.layers), "sources": dict(sorted(self.sources.items()))}


def _zero(name: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    arr = np.zeros(shape, dtype=dtype.numpy())
    return ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype), const_value=ir.tensor(arr, name=name))


def weight_qdq_pass(view: Mapping[str, Any], scheme: str, report: WeightQuantReport | None = None,
                    selects: Callable[[str], bool] = is_block_linear):  # fmt: skip
    """A graph pass (`export_onnx(passes=...)`) that quantizes every linear weight `selects` names (default: the DiT's block linears)."""
    check_scheme(scheme)
    report = report if report is not None else WeightQuantReport(scheme)

    def run(model: ir.Model) -> None:
        graph = model.graph
        code_type = _IR_CODE_TYPES[scheme]
        for node in list(graph):
            w = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
            if w is None or not w.is_initializer() or not selects(w.name) or len(w.shape) != 2:
                continue
            perm = node.attributes.get_ints("perm")
            consumers = node.outputs[0].uses()
            if list(perm or [1, 0]) != [1, 0] or not consumers or any(
                u.node.op_type != "MatMul" or u.idx != 1 for u in consumers
            ):
                raise QuantizeError(f"{w.name}: expected Transpose -> MatMul B in the traced graph, found another pattern")
            key, (n_out, k_in) = w.name, (int(w.shape[0]), int(w.shape[1]))
            loader = _WeightLoader(view, key, scheme, _TORCH_SCALE[w.dtype])
            graph.initializers.pop(key)
            codes = ir.Value(name=key, shape=ir.Shape([k_in, n_out]), type=ir.TensorType(code_type),
                             const_value=ir.LazyTensor(loader.codes, code_type, ir.Shape([k_in, n_out]), name=key))
            scale = ir.Value(name=key + SCALE_SUFFIX, shape=ir.Shape([n_out]), type=ir.TensorType(w.dtype),
                             const_value=ir.LazyTensor(loader.scale, w.dtype, ir.Shape([n_out]), name=key + SCALE_SUFFIX,
                                                       cache=True))
            zero = _zero(key + ZERO_SUFFIX, code_type, (n_out,))
            for v in (codes, scale, zero):
                graph.register_initializer(v)
            dq = ir.node("DequantizeLinear", [codes, scale, zero], {"axis": WEIGHT_AXIS}, name=f"{layer_of(key)}/weight_dq")
            dq.outputs[0].name = f"{key}_dequantized"
            dq.outputs[0].dtype, dq.outputs[0].shape = w.dtype, ir.Shape([k_in, n_out])
            graph.insert_before(node, dq)
            node.outputs[0].replace_all_uses_with(dq.outputs[0])
            graph.remove(node, safe=True)
            report.layers.append(layer_of(key))
            how = source_of_codes(view[key], scheme)
            report.sources[how] = report.sources.get(how, 0) + 1

    return run


# --------------------------------------------------------------------------------------------
# the saved graph: quantized MatMuls, calibration outputs, activation Q/DQ (onnx protos, graph only)


@dataclass(frozen=True)
class QuantizedMatMul:
    """One MatMul whose B is a dequantized block-linear weight."""

    layer: str  # `blocks.0.self_attn.q`
    node: str  # the MatMul's name
    input: str  # the tensor its A reads


def quantized_matmuls(model: onnx.ModelProto) -> list[QuantizedMatMul]:
    """Every MatMul fed by a block-linear weight DequantizeLinear, in graph order."""
    dq_layer = {
        n.output[0]: layer_of(n.input[0])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and is_block_linear(n.input[0])
    }
    return [
        QuantizedMatMul(dq_layer[n.input[1]], n.name, n.input[0])
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in dq_layer
    ]


def amax_output(input_name: str) -> str:
    return f"calib_amax::{input_name}"


def with_amax_outputs(model: onnx.ModelProto, full_inputs: bool = False,
                      extra: Mapping[str, list[str]] | None = None) -> tuple[onnx.ModelProto, dict[str, list[str]]]:  # fmt: skip
    """A copy of `model` that also outputs max |x| (or, `full_inputs`, x itself) of each quantized MatMul input.

    `extra`: more tensors to observe, {tensor: [keys]} (the attention inputs, `calibration.attention_qdq`).
    Returns the model and {graph output name: [layers (keys) reading that input]}."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    readers: dict[str, list[str]] = {}
    for mm in quantized_matmuls(model):
        readers.setdefault(mm.input, []).append(mm.layer)
    for x, keys in (extra or {}).items():
        readers.setdefault(x, []).extend(keys)
    outputs: dict[str, list[str]] = {}
    for x, layers in readers.items():
        if full_inputs:
            out.graph.output.append(helper.make_empty_tensor_value_info(x))
            outputs[x] = layers
            continue
        name = amax_output(x)
        out.graph.node.extend([
            helper.make_node("Abs", [x], [name + "/abs"], name=name + "/Abs"),
            helper.make_node("ReduceMax", [name + "/abs"], [name], name=name + "/ReduceMax", keepdims=0),
        ])
        out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []))
        outputs[name] = layers
    return out, outputs


def _dtype_of(model: onnx.ModelProto, tensor: str, fallback: int) -> int:
    """The element type of `tensor`, from shape inference on the graph (weights not loaded)."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return fallback


@dataclass(frozen=True)
class QdqPlacement:
    """One `tensor -> QuantizeLinear -> DequantizeLinear` in front of input `index` of the node `node`."""

    node: str
    index: int
    tensor: str
    owner: str  # names: initializers `{owner}.{what}_scale` / `_zero_point`, nodes `{owner}/{what}_q` / `_dq`
    what: str
    scale: float


def activation_scale(amax: float, fmt: QuantFormat) -> float:
    """The per-tensor scale of a calibrated range: max(amax, floor) / qmax."""
    return max(amax, AMAX_FLOOR) / fmt.qmax


def insert_qdq(model: onnx.ModelProto, placements: list[QdqPlacement], scheme: str) -> None:
    """Insert each placement's Q/DQ pair (zero point 0; the scale in the tensor's dtype), each just before its node."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    new_inits, nodes_before = [], {}
    for p in placements:
        elem = _dtype_of(inferred, p.tensor, onnx.TensorProto.FLOAT)
        s_name, z_name = f"{p.owner}.{p.what}_scale", f"{p.owner}.{p.what}" + ZERO_SUFFIX
        if elem == onnx.TensorProto.FLOAT:
            new_inits.append(numpy_helper.from_array(np.array(p.scale, dtype=np.float32), s_name))
        else:  # a bf16 / fp16 graph: the scale in the activation's dtype (TensorRT's strong typing)
            new_inits.append(helper.make_tensor(s_name, elem, [], [p.scale]))
        new_inits.append(helper.make_tensor(z_name, _ONNX_CODE_TYPES[scheme], [], [0]))
        q_out, dq_out = f"{p.owner}.{p.what}_quantized", f"{p.owner}.{p.what}_dequantized"
        nodes_before.setdefault(p.node, []).append((p.index, [
            helper.make_node("QuantizeLinear", [p.tensor, s_name, z_name], [q_out], name=f"{p.owner}/{p.what}_q"),
            helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=f"{p.owner}/{p.what}_dq"),
        ]))
    ordered = []
    for n in model.graph.node:
        for index, pair in nodes_before.get(n.name, ()):
            ordered.extend(pair)
            n.input[index] = pair[1].output[0]
        ordered.append(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    model.graph.initializer.extend(new_inits)


def insert_activation_qdq(model: onnx.ModelProto, scheme: str, amax: Mapping[str, float]) -> dict[str, float]:
    """Put `x -> Q -> DQ` in front of each quantized MatMul's A, scale = amax / qmax per layer; return the scales.

    `amax` maps each quantized layer to the calibrated max |x| of its input.  Each MatMul gets its
    own pair, also where several read one tensor (q/k/v): ONNX Runtime fuses a Q->DQ->MatMul into
    MatMulIntegerToFloat only when the Q feeds one DQ, and TensorRT fuses each pair into its consumer."""
    fmt = check_scheme(scheme)
    mms = quantized_matmuls(model)
    missing = [m.layer for m in mms if m.layer not in amax]
    if missing:
        raise QuantizeError(f"no calibrated range for {len(missing)} quantized linear input(s), e.g. {missing[0]}")
    scales: dict[str, float] = {}
    for m in mms:
        top = float(amax[m.layer])
        if not math.isfinite(top):
            raise QuantizeError(f"the calibrated range of {m.layer}'s input is {top}; expected a finite value")
        scales[m.layer] = activation_scale(top, fmt)
    insert_qdq(model, [QdqPlacement(m.node, 0, m.input, m.layer, "input", scales[m.layer]) for m in mms], scheme)
    return scales
