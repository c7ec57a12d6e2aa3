"""TensorRT-compatibility lint for exported ONNX files (`python cli.py lint-onnx FILE`).

Checks, each reported as one line naming the node / tensor at fault:
- `onnx.checker` full check with strict shape inference, through the path API (so models with
  external data, and over 2 GB, are checked as saved);
- the default-domain opset is inside the parser's range, and every op is in the operator list
  of TensorRT's ONNX parser (`export/onnx/data/trt_onnx_ops_10.1.json`, derived from onnx-tensorrt's
  docs/operators.md at 10.1 GA; ops added by later parsers are named in the message);
- each op runs on a tensor type that list names for it (`TYPE_NAMES`): the element types (by
  ONNX shape inference) of the tensors bound to the op's data type constraint, i.e. that of its
  first input (`TYPED_OPERANDS` for the ops where it is another one), so Gather's indices or
  Greater's bool output are not held to the list;
- the input that TensorRT requires to be an initializer (`axes` of Squeeze/Unsqueeze/Reduce*/
  Slice/Pad, `axis` of CumSum) is one;
- no custom-domain op except our attention plugin (`plugins_trt.onnx_op`);
- no initializer over 2 GiB, no float64 tensors, all external data in one file beside the model
  that holds every byte it is said to;
- graph inputs/outputs carry exactly the signature's names, dtypes and dims: dynamic (named)
  dims only where the signature declares them (without a signature: no unnamed dynamic dims);
- explicit quantization (`_check_qdq`, tensorrt.md §3): every Q/DQ scale and zero point is an
  initializer; zero points are all 0; scales are positive and finite, a scalar (per tensor) or
  1-D with one value per index of a valid `axis` (per channel); float8 Q/DQ only at opset >= 19;
  every QuantizeLinear feeds only DequantizeLinears; an activation's DQ (one fed by a Q) feeds only
  MatMul / Gemm / Conv or our attention plugin, so the residual stream is never quantized;
- quantized attention (`_check_attention_qdq`): each `MatMul -> (Mul/Div) -> (Add) -> Softmax ->
  MatMul` has Q/DQ on all four MatMul operands (q, k^T, the softmax output, v) or on none; a
  partial placement is one TensorRT's fp8 attention fusion cannot match.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np
import onnx
from onnx import helper, numpy_helper

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import EngineSignature
from wanrt.plugins_trt.onnx_op import DOMAIN as PLUGIN_DOMAIN
from wanrt.plugins_trt.onnx_op import OP_TYPE as PLUGIN_OP
from wanrt.plugins_trt.onnx_op import is_plugin_node

TRT_OPS_FILE = Path(__file__).parent / "data" / "trt_onnx_ops_10.1.json"
MAX_INITIALIZER_BYTES = 2 << 30
# op -> index of the input TensorRT requires to be an initializer ("`axes` must be an initializer").
CONSTANT_INPUTS: dict[str, tuple[int, str]] = {
    **{op: (1, "axes") for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze",
    )},
    "Slice": (3, "axes"),
    "Pad": (3, "axes"),
    "CumSum": (1, "axis"),
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
# The operator list's type names -> ONNX element types.  "INF64" is a typo of the upstream table
# (ConstantOfShape); FP8 in TensorRT 10.1 is e4m3.
TYPE_NAMES: dict[str, int] = {
    "FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "BF16": onnx.TensorProto.BFLOAT16,
    "FP8": onnx.TensorProto.FLOAT8E4M3FN, "INT4": onnx.TensorProto.INT4, "INT8": onnx.TensorProto.INT8,
    "UINT8": onnx.TensorProto.UINT8, "INT32": onnx.TensorProto.INT32, "INT64": onnx.TensorProto.INT64,
    "INF64": onnx.TensorProto.INT64, "BOOL": onnx.TensorProto.BOOL,
}  # fmt: skip
# Ops whose listed types are not those of their first input's constraint: ("input"|"output", index)
# of each operand whose constraint the list describes; () = not checked (control flow: its bodies are).
TYPED_OPERANDS: dict[str, tuple[tuple[str, int], ...]] = {
    "Where": (("input", 1),),  # input 0 is the bool condition
    "ConstantOfShape": (("output", 0),),  # input 0 is the int64 shape
    "Cast": (("input", 0), ("output", 0)),  # both ends of a cast
    "CastLike": (("input", 0), ("input", 1)),
    "If": (), "Loop": (), "Scan": (),
}  # fmt: skip


@dataclass(frozen=True)
class TrtOpSupport:
    """The ONNX operators one TensorRT ONNX-parser version accepts."""

    tensorrt: str
    opset_range: tuple[int, int]
    supported: dict[str, dict[str, Any]]
    unsupported: tuple[str, ...] = ()
    added_later: dict[str, dict[str, str]] = field(default_factory=dict)
    source: str = ""


@lru_cache(maxsize=None)
def load_trt_op_support(path: Path = TRT_OPS_FILE) -> TrtOpSupport:
    """Read the operator list kept as data in the repository."""
    d = json.loads(Path(path).read_text())
    return TrtOpSupport(
        tensorrt=d["tensorrt_onnx_parser"],
        opset_range=(int(d["opset_range"][0]), int(d["opset_range"][1])),
        supported=d["supported"],
        unsupported=tuple(d["unsupported"]),
        added_later=d.get("added_later", {}),
        source=d.get("source", ""),
    )


def parse_trt_operator_table(md: str) -> dict[str, Any]:
    """Parse onnx-tensorrt's docs/operators.md into {opset_range, supported, unsupported}."""
    m = re.search(r"range of opset (\d+) to opset (\d+)", md)
    if m is None:
        raise ValueError("operators.md: no 'range of opset A to opset B' sentence")
    supported: dict[str, dict[str, Any]] = {}
    unsupported: list[str] = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") or not re.fullmatch(r"[A-Za-z0-9]+", cells[0]):
            continue
        if cells[1] == "N":
            unsupported.append(cells[0])
            continue
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        restrictions = cells[3].strip() if len(cells) > 3 else ""
        supported[cells[0]] = {"types": types, "restrictions": restrictions}
    return {"opset_range": [int(m.group(1)), int(m.group(2))], "supported": supported, "unsupported": unsupported}


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_graphs(g)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type != onnx.TensorProto.STRING else 1
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _dtype_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "undefined"


def lint_onnx(path: str | os.PathLike, signature: EngineSignature | None = None, support: TrtOpSupport | None = None) -> list[str]:
    """Every TensorRT-compatibility problem of the ONNX file at `path` (empty list = clean)."""
    path = Path(path)
    support = support or load_trt_op_support()
    if not path.is_file():
        return [f"{path}: no such ONNX file"]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        return [f"{path}: not a readable ONNX model ({type(e).__name__}: {e})"]
    problems: list[str] = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        problems.append(f"onnx.checker: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    problems += _check_opsets(model, support)
    problems += _check_nodes(model, support)
    problems += _check_types(model, support)
    problems += _check_initializers(model, path)
    problems += _check_io(model, signature)
    problems += _check_qdq(model, path)
    problems += _check_attention_qdq(model)
    return problems


def _check_opsets(model: onnx.ModelProto, support: TrtOpSupport) -> list[str]:
    problems = []
    lo, hi = support.opset_range
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            problems.append(f"opset {imp.version}: TensorRT {support.tensorrt}'s ONNX parser supports opsets {lo} to {hi}")
        elif imp.domain not in _DEFAULT_DOMAINS and imp.domain != PLUGIN_DOMAIN:
            problems.append(f"opset domain {imp.domain!r}: not supported (only our plugin domain {PLUGIN_DOMAIN!r})")
    return problems


def _check_nodes(model: onnx.ModelProto, support: TrtOpSupport) -> list[str]:
    problems: list[str] = []
    local_functions = {(f.domain, f.name) for f in model.functions}
    graphs = list(_iter_graphs(model.graph))
    constants = {init.name for g in graphs for init in g.initializer}
    constants |= {out for g in graphs for n in g.node if n.op_type == "Constant" for out in n.output}
    nodes = [n for g in graphs for n in g.node] + [n for f in model.functions for n in f.node]
    reported: set[tuple[str, str]] = set()
    for node in nodes:
        where = f"node {node.name or '(unnamed)'}"
        if node.domain in _DEFAULT_DOMAINS:
            if node.op_type not in support.supported and (node.domain, node.op_type) not in reported:
                reported.add((node.domain, node.op_type))
                later = support.added_later.get(node.op_type)
                hint = f" (supported from TensorRT {later['tensorrt']})" if later else ""
                problems.append(f"{where}: op {node.op_type} is not supported by TensorRT {support.tensorrt}'s ONNX parser{hint}")
            if node.op_type in CONSTANT_INPUTS:
                index, what = CONSTANT_INPUTS[node.op_type]
                if len(node.input) > index and node.input[index] and node.input[index] not in constants:
                    problems.append(f"{where}: {node.op_type} `{what}` input {node.input[index]!r} must be an initializer for TensorRT")
        elif (node.domain, node.op_type) in local_functions:
            continue
        elif is_plugin_node(node.domain, node.op_type):
            continue
        elif (node.domain, node.op_type) not in reported:
            reported.add((node.domain, node.op_type))
            problems.append(
                f"{where}: custom op {node.domain}::{node.op_type} needs a TensorRT plugin that is not ours "
                f"(only {PLUGIN_DOMAIN}::{PLUGIN_OP})"
            )
    return problems


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, for every tensor whose type shape inference can tell."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # the checker reports what is wrong; check what is known
        pass
    types: dict[str, int] = {}
    for g in _iter_graphs(model.graph):
        types |= {t.name: t.data_type for t in g.initializer}
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _typed_operands(node: onnx.NodeProto, schema: onnx.defs.OpSchema) -> list[str]:
    """The names of the node's inputs/outputs bound to the type constraint its TensorRT type list describes."""
    def formal(params: list, index: int):
        if index < len(params):
            return params[index]
        last = params[-1] if params else None
        return last if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None

    picks = TYPED_OPERANDS.get(node.op_type, (("input", 0),))
    wanted = set()
    for side, index in picks:
        param = formal(schema.inputs if side == "input" else schema.outputs, index)
        if param is not None:
            wanted.add(param.type_str)
    names = []
    for actual, params in ((node.input, schema.inputs), (node.output, schema.outputs)):
        for i, name in enumerate(actual):
            param = formal(params, i)
            if name and param is not None and param.type_str in wanted:
                names.append(name)
    return names


def _check_types(model: onnx.ModelProto, support: TrtOpSupport) -> list[str]:
    problems: list[str] = []
    opset = next((i.version for i in model.opset_import if i.domain in _DEFAULT_DOMAINS), None)
    types = _element_types(model)
    reported: set[tuple[str, int]] = set()
    for node in (n for g in _iter_graphs(model.graph) for n in g.node):
        listed = support.supported.get(node.op_type, {}).get("types")
        if node.domain not in _DEFAULT_DOMAINS or not listed or opset is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue  # an unknown op: _check_nodes reports it
        allowed = {TYPE_NAMES[t] for t in listed if t in TYPE_NAMES}
        for name in _typed_operands(node, schema):
            elem = types.get(name)
            if elem is None or elem in allowed or (node.op_type, elem) in reported:
                continue
            reported.add((node.op_type, elem))
            problems.append(
                f"node {node.name or '(unnamed)'}: {node.op_type} on {_dtype_name(elem)} tensor {name!r}; TensorRT "
                f"{support.tensorrt}'s ONNX parser supports {node.op_type} on {', '.join(listed)}"
            )
    return problems


def _check_initializers(model: onnx.ModelProto, path: Path) -> list[str]:
    problems: list[str] = []
    files: dict[str, int] = {}  # location -> bytes needed
    for g in _iter_graphs(model.graph):
        for t in g.initializer:
            size = _tensor_bytes(t)
            if size > MAX_INITIALIZER_BYTES:
                problems.append(f"initializer {t.name!r}: {size / 2**30:.2f} GiB, more than TensorRT's 2 GiB per weight")
            if t.data_type == onnx.TensorProto.DOUBLE:
                problems.append(f"initializer {t.name!r}: float64 (TensorRT casts DOUBLE down to float32)")
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(t)
                location = info.get("location", "")
                end = int(info.get("offset", 0)) + int(info.get("length", size))
                files[location] = max(files.get(location, 0), end)
    if len(files) > 1:
        problems.append(f"external data is spread over {len(files)} files {sorted(files)}; expected one")
    for location, end in files.items():
        data = path.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts or "/" in location:
            problems.append(f"external data location {location!r} is not a file beside {path.name}")
        elif not data.is_file():
            problems.append(f"external data file {data} is missing")
        elif data.stat().st_size < end:
            problems.append(f"external data file {data} holds {data.stat().st_size} bytes; the initializers need {end}")
    return problems


def node_links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """({tensor: the node producing it}, {tensor: the nodes reading it}) of one graph (subgraphs not entered)."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QUANTIZED_CONSUMERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")  # where TensorRT fuses an activation's DQ
FP8_MIN_OPSET = 19


def _check_qdq(model: onnx.ModelProto, path: Path) -> list[str]:
    """The rules TensorRT's explicit quantization needs (see the module docstring)."""
    graph = model.graph
    nodes = [n for n in graph.node if n.domain in _DEFAULT_DOMAINS and n.op_type in QDQ_OPS]
    if not nodes:
        return []
    problems: list[str] = []
    opset = next((i.version for i in model.opset_import if i.domain in _DEFAULT_DOMAINS), 0)
    inits = {t.name: t for t in graph.initializer}
    producers, consumers = node_links(graph)
    types = _element_types(model)
    values: dict[str, Any] = {}

    def value(name: str):
        if name not in values:
            values[name] = numpy_helper.to_array(inits[name], base_dir=str(path.parent))
        return values[name]

    for node in nodes:
        where = f"node {node.name or '(unnamed)'}: {node.op_type}"
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zero_name = node.input[2] if len(node.input) > 2 else ""
        if scale_name not in inits:
            problems.append(f"{where}: scale {scale_name!r} is not an initializer (TensorRT needs build-time constant scales)")
            continue
        scale = value(scale_name).astype("float64")
        if scale.size == 0 or not (scale > 0).all() or not np.isfinite(scale).all():
            problems.append(f"{where}: scale {scale_name!r} must be positive and finite")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim > 1:
            problems.append(f"{where}: scale {scale_name!r} has shape {list(scale.shape)}; expected a scalar or 1-D per channel")
        elif scale.ndim == 1 and scale.size > 1:
            data = node.input[0]
            shape = _static_shape(model, data, inits)
            if shape is not None:
                if not -len(shape) <= axis < len(shape):
                    problems.append(f"{where}: axis {axis} is outside the rank {len(shape)} of {data!r}")
                elif isinstance(shape[axis], int) and shape[axis] != scale.size:
                    problems.append(f"{where}: {scale.size} per-channel scales for axis {axis} of {data!r} {shape}")
        code_type = None
        if zero_name:
            if zero_name not in inits:
                problems.append(f"{where}: zero point {zero_name!r} is not an initializer")
            else:
                code_type = inits[zero_name].data_type
                if value(zero_name).astype("float64").any():
                    problems.append(f"{where}: zero point {zero_name!r} is not 0 (TensorRT quantization is symmetric)")
        if node.op_type == "DequantizeLinear":
            code_type = types.get(node.input[0], code_type)
        if code_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2) and opset < FP8_MIN_OPSET:
            problems.append(f"{where}: float8 Q/DQ needs opset {FP8_MIN_OPSET} or newer (the graph is opset {opset})")
        if node.op_type == "QuantizeLinear":
            bad = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad or not consumers.get(node.output[0]):
                problems.append(f"{where}: its output must feed DequantizeLinear only (feeds {bad or 'nothing'})")
        else:
            fed_by_q = getattr(producers.get(node.input[0]), "op_type", None) == "QuantizeLinear"
            bad = [c.op_type for c in consumers.get(node.output[0], [])
                   if fed_by_q and c.op_type not in QUANTIZED_CONSUMERS and not is_plugin_node(c.domain, c.op_type)]
            if bad:
                problems.append(f"{where}: a quantized activation feeds {', '.join(sorted(set(bad)))}; only "
                                f"{'/'.join(QUANTIZED_CONSUMERS)} or the attention plugin may read it (no Q/DQ on the residual stream)")
    return problems


ATTENTION_OPERANDS = ("q", "k^T", "softmax output", "v")
_SCORE_OPS = ("Mul", "Div", "Add")  # what may sit between BMM1 and the Softmax (scale, mask)


def _check_attention_qdq(model: onnx.ModelProto) -> list[str]:
    """Each attention's MatMul operands are all quantized (Q -> DQ in front) or none is."""
    graph = model.graph
    producers, consumers = node_links(graph)

    def quantized(tensor: str) -> bool:
        dq = producers.get(tensor)
        return dq is not None and dq.op_type == "DequantizeLinear" and getattr(producers.get(dq.input[0]), "op_type", None) == "QuantizeLinear"

    def only(tensor: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    problems = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        bmm1 = producers.get(sm.input[0])
        while bmm1 is not None and bmm1.op_type in _SCORE_OPS:
            bmm1 = producers.get(bmm1.input[0])
        probs, bmm2 = sm.output[0], only(sm.output[0], "MatMul")
        q = only(sm.output[0], "QuantizeLinear")
        dq = only(q.output[0], "DequantizeLinear") if q is not None else None
        if dq is not None:
            probs, bmm2 = dq.output[0], only(dq.output[0], "MatMul")
        if bmm1 is None or bmm1.op_type != "MatMul" or bmm2 is None or bmm2.input[0] != probs:
            continue
        flags = [quantized(t) for t in (bmm1.input[0], bmm1.input[1], bmm2.input[0], bmm2.input[1])]
        if any(flags) and not all(flags):
            have = [o for o, f in zip(ATTENTION_OPERANDS, flags) if f]
            lack = [o for o, f in zip(ATTENTION_OPERANDS, flags) if not f]
            problems.append(f"attention at node {sm.name or '(unnamed)'}: Q/DQ on {', '.join(have)} but not on {', '.join(lack)}; "
                            "TensorRT's fp8 attention fusion needs all of q, k^T, the softmax output and v quantized, or none")
    return problems


def _static_shape(model: onnx.ModelProto, name: str, inits: dict[str, onnx.TensorProto]) -> list[int | str] | None:
    """The dims of `name` (an initializer's, or a graph value's as recorded), None when unknown."""
    if name in inits:
        return list(inits[name].dims)
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
    return None


def _io_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None) for d in t.shape.dim]


def _check_io(model: onnx.ModelProto, signature: EngineSignature | None) -> list[str]:
    problems: list[str] = []
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    for kind, values in (("input", inputs), ("output", list(graph.output))):
        for vi in values:
            if vi.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
                problems.append(f"{kind} {vi.name}: float64 (TensorRT casts DOUBLE down to float32)")
            if not vi.type.tensor_type.HasField("shape"):
                problems.append(f"{kind} {vi.name}: no shape (rank unknown)")
            elif None in _io_dims(vi) or "" in _io_dims(vi):
                problems.append(f"{kind} {vi.name}: unnamed dynamic dim in {_io_dims(vi)}")
    if signature is None:
        return problems
    for kind, values, specs in (("input", inputs, signature.inputs), ("output", list(graph.output), signature.outputs)):
        got_names = [vi.name for vi in values]
        want_names = [s.name for s in specs]
        if got_names != want_names:
            problems.append(f"{kind}s {got_names}, the signature declares {want_names}")
            continue
        for vi, spec in zip(values, specs):
            dtype = _dtype_name(vi.type.tensor_type.elem_type)
            if dtype != spec.dtype:
                problems.append(f"{kind} {vi.name}: dtype {dtype}, the signature declares {spec.dtype}")
            dims = _io_dims(vi)
            if len(dims) != len(spec.shape):
                problems.append(f"{kind} {vi.name}: shape {dims}, the signature declares {list(spec.shape)}")
                continue
            for axis, (got, want) in enumerate(zip(dims, spec.shape)):
                if isinstance(want, int) and got != want:
                    what = "dynamic" if isinstance(got, str) else "static"
                    problems.append(f"{kind} {vi.name}: dim {axis} is {what} {got!r}, the signature declares {want}")
                elif isinstance(want, str) and got != want:
                    problems.append(f"{kind} {vi.name}: dim {axis} is {got!r}, the signature declares dynamic {want!r}")
    return problems


def _bundle_signature(onnx_path: Path) -> EngineSignature | None:
    """The signature of the bundle component whose ONNX file this is, if it lies in a bundle."""
    from wanrt.engines.manifest import MANIFEST_NAME, read_manifest

    for root in onnx_path.resolve().parents:
        if (root / MANIFEST_NAME).is_file():
            manifest = read_manifest(root)
            for comp in manifest.components.values():
                if comp.onnx is not None and (root / comp.onnx).resolve() == onnx_path.resolve():
                    return comp.signature
            return None
    return None


@click.command("lint-onnx")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--signature", "signature_file", type=click.Path(dir_okay=False, exists=True),
              help="JSON engine signature ({inputs, outputs, dim_ranges}); default: the bundle manifest's, if FILE is in a bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def lint_onnx_command(file: str, signature_file: str | None, as_json: bool) -> None:
    """Check FILE against what TensorRT's ONNX parser accepts; exit 1 when it finds problems."""
    path = Path(file)
    if not path.is_file():
        raise WanrtError(f"{path}: no such ONNX file")
    if signature_file:
        try:
            signature = EngineSignature.from_dict(json.loads(Path(signature_file).read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise WanrtError(f"{signature_file}: not an engine signature JSON ({type(e).__name__}: {e})") from None
    else:
        signature = _bundle_signature(path)
    support = load_trt_op_support()
    problems = lint_onnx(path, signature, support)
    if as_json:
        click.echo(json.dumps({
            "file": str(path), "ok": not problems, "problems": problems,
            "tensorrt_onnx_parser": support.tensorrt, "signature_checked": signature is not None,
        }))
    elif problems:
        click.echo(f"{path}: {len(problems)} problem(s) for TensorRT {support.tensorrt}:")
        for p in problems:
            click.echo(f"  - {p}")
    else:
        click.echo(f"{path}: OK for TensorRT {support.tensorrt}'s ONNX parser" + ("" if signature else " (no signature checked)"))
    raise SystemExit(1 if problems else 0)
