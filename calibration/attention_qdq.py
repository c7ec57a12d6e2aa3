"""fp8 Q/DQ on the DiT's attention (`build-engine --quantize fp8 --quantize-attention`).

Our native attention (`export.models.attention`) exports as

    q -> Mul(1/sqrt(head_dim)) -> MatMul(., k^T) -> Softmax -> MatMul(., v)

and this pass puts one per-tensor fp8 `QuantizeLinear -> DequantizeLinear` pair on each of the
four MatMul operands: the scaled q, k^T (after its Transpose), the softmax output and v.  That is
the placement TensorRT's fp8 attention fusion matches (tensorrt.md §3/§5; ModelOpt's
`export_fp8_mha` emits Mul(scale) -> Q -> DQ -> BMM1 -> Softmax -> Q -> DQ -> BMM2, with Q/DQ on
q, k^T, v and the softmax output).  q, k and v get calibrated scales (amax / 448, the same
observers as the linears' inputs); the softmax output has the fixed scale `SOFTMAX_SCALE`.

Softmax scale: 1/448 maps the probabilities' range [0, 1] onto the whole e4m3 range, so a
probability p keeps 3 mantissa bits down to p = 2^-6 / 448 (3.5e-5) and is flushed to 0 only
below 2^-10 / 448; ModelOpt hard-codes 1.0, under which every probability under 2^-10 (1e-3) is 0
and those under 2^-6 (0.016) are subnormal.  Over thousands of keys most probabilities are that
small: at 1.0 the attention output loses most of its mass (measured on the tiny model, see
tests/calibration/test_attention_qdq.py and the README).

Which attentions: self-attention only (`QUANTIZED_KINDS`; VACE blocks' self-attention too).  It
is where the time goes (L x L scores against L x 512 text and L x 257 image keys: at 480p, 81
frames, L = 32760, cross-attention is about 2% of self-attention's FLOPs), so quantizing the text
and image branches would add their error for no measurable speed.  Attentions whose v does not
come from a DiT block linear (Animate's face adapter) are never quantized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from wanrt.export.checkpoint.storage import is_block_linear

from .qdq import QdqPlacement, QuantizeError, activation_scale, check_scheme, insert_qdq, layer_of

OPERANDS = ("q", "k", "v")  # the calibrated operands; the softmax output's scale is fixed
SOFTMAX_SCALE = 1.0 / 448.0
QUANTIZED_KINDS = ("self",)  # of "self", "text" (cross-attention), "image" (the i2v image branch)
SCHEME = "fp8"  # ModelOpt and TensorRT fuse fp8 attention only (ModelOpt rejects INT8 MHA)
# ops a value passes through unchanged in layout terms between a linear and the attention
_PASS_THROUGH = ("Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class AttentionSite:
    """One attention of the graph: its two MatMuls and the four tensors they read."""

    name: str  # `blocks.0.self_attn.attention`, `blocks.0.cross_attn.attention_img`
    kind: str  # "self", "text" or "image"
    bmm1: str  # node names
    bmm2: str
    q: str  # BMM1's A (q, already scaled by 1/sqrt(head_dim))
    k: str  # BMM1's B (k^T)
    probs: str  # BMM2's A (the softmax output)
    v: str  # BMM2's B

    def key(self, operand: str) -> str:
        """The observers' / scales' key of one operand: `blocks.0.self_attn.attention.q`."""
        return f"{self.name}.{operand}"


def _linear_layer(model_nodes: Mapping[str, onnx.NodeProto], inits: set[str], tensor: str) -> str | None:
    """The block linear whose output `tensor` is (through reshapes, transposes, casts and its bias Add), or None."""
    node = model_nodes.get(tensor)
    while node is not None:
        if node.op_type in _PASS_THROUGH:
            node = model_nodes.get(node.input[0])
        elif node.op_type == "Add" and len(node.input) == 2 and any(i in inits for i in node.input):
            node = model_nodes.get(next(i for i in node.input if i not in inits))
        elif node.op_type == "MatMul" and len(node.input) == 2:
            b = model_nodes.get(node.input[1])
            if b is not None and b.op_type in ("DequantizeLinear", "Transpose") and is_block_linear(b.input[0]):
                return layer_of(b.input[0])
            return None
        else:
            return None
    return None


def attention_sites(model: onnx.ModelProto) -> list[AttentionSite]:
    """Every `MatMul -> Softmax -> MatMul` attention whose v is a DiT block linear's output, in graph order."""
    from wanrt.export.onnx.lint import node_links

    graph = model.graph
    producers, consumers = node_links(graph)
    inits = {t.name for t in graph.initializer}
    sites = []
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        bmm1 = producers.get(sm.input[0])
        bmm2 = consumers.get(sm.output[0], [])
        if bmm1 is None or bmm1.op_type != "MatMul" or len(bmm2) != 1 or bmm2[0].op_type != "MatMul":
            continue
        bmm2 = bmm2[0]
        if bmm2.input[0] != sm.output[0]:
            continue
        v_layer = _linear_layer(producers, inits, bmm2.input[1])
        if v_layer is None:
            continue
        parent, leaf = v_layer.rsplit(".", 1)
        kind = "image" if leaf == "v_img" else "self" if parent.endswith("self_attn") else "text"
        name = f"{parent}.attention{'_img' if kind == 'image' else ''}"
        sites.append(AttentionSite(name, kind, bmm1.name, bmm2.name, bmm1.input[0], bmm1.input[1], sm.output[0], bmm2.input[1]))
    return sites


def quantized_sites(model: onnx.ModelProto, kinds: tuple[str, ...] = QUANTIZED_KINDS) -> list[AttentionSite]:
    """The attentions `--quantize-attention` quantizes."""
    return [s for s in attention_sites(model) if s.kind in kinds]


def observed_inputs(sites: list[AttentionSite]) -> dict[str, list[str]]:
    """{tensor: [observer keys]} of the calibrated operands (one q feeds both branches of an i2v cross-attention)."""
    readers: dict[str, list[str]] = {}
    for site in sites:
        for operand in OPERANDS:
            readers.setdefault(getattr(site, operand), []).append(site.key(operand))
    return readers


def insert_attention_qdq(model: onnx.ModelProto, sites: list[AttentionSite], amax: Mapping[str, float],
                         softmax_scale: float = SOFTMAX_SCALE) -> dict[str, dict[str, float]]:  # fmt: skip
    """Put fp8 `Q -> DQ` on q, k^T, v (scale = amax / 448) and the softmax output (`softmax_scale`) of each site.

    Returns {site: {"q", "k", "v", "softmax": scale}}."""
    fmt = check_scheme(SCHEME)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise QuantizeError(f"softmax output scale {softmax_scale}: expected a positive finite value")
    missing = [s.key(o) for s in sites for o in OPERANDS if s.key(o) not in amax]
    if missing:
        raise QuantizeError(f"no calibrated range for {len(missing)} attention input(s), e.g. {missing[0]}")
    scales: dict[str, dict[str, float]] = {}
    placements = []
    for s in sites:
        for operand in OPERANDS:
            top = float(amax[s.key(operand)])
            if not math.isfinite(top):
                raise QuantizeError(f"the calibrated range of {s.name}'s {operand} is {top}; expected a finite value")
        scales[s.name] = {o: activation_scale(float(amax[s.key(o)]), fmt) for o in OPERANDS} | {"softmax": softmax_scale}
        placements += [QdqPlacement(s.bmm1, 0, s.q, s.name, "q", scales[s.name]["q"]),
                       QdqPlacement(s.bmm1, 1, s.k, s.name, "k", scales[s.name]["k"]),
                       QdqPlacement(s.bmm2, 0, s.probs, s.name, "softmax", softmax_scale),
                       QdqPlacement(s.bmm2, 1, s.v, s.name, "v", scales[s.name]["v"])]  # fmt: skip
    insert_qdq(model, placements, SCHEME)
    return scales


def attention_options() -> dict[str, Any]:
    """What `--quantize-attention` does to the graph besides the calibrated scales (the build cache key's part)."""
    return {"scheme": SCHEME, "kinds": list(QUANTIZED_KINDS), "softmax_scale": SOFTMAX_SCALE, "granularity": "per_tensor"}


def attention_record(scales: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The manifest's record of a quantized expert's attention: the options and every site's scales."""
    return {**attention_options(), "sites": len(scales), "scales": {site: dict(scales[site]) for site in sorted(scales)}}
