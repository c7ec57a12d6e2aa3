"""fp8 attention Q/DQ (`--quantize-attention`) in ONNX Runtime against a torch reference written from the math.

References, independent of the code under test:
- tensorrt.md §3/§5 (ModelOpt `export_fp8_mha`, TensorRT's fused-attention pattern): per-tensor fp8
  Q/DQ on the (pre-scaled) q, on k^T, on v and on the softmax output, each directly in front of
  its MatMul: Mul(scale) -> Q -> DQ -> BMM1 -> Softmax -> Q -> DQ -> BMM2;
- the ONNX QuantizeLinear spec (`tests.calibration.helpers.fake_quant`); fp8 e4m3 max 448, so a
  calibrated scale is amax / 448;
- attention is softmax(q k^T / sqrt(head_dim)) v (Wan's official attention, no mask).
The torch reference is our WanDiT (tested against diffusers) with the graph's weight codes * scales
in each block linear, the graph's input scales on each linear, and its attention replaced by the
function below, which fake-quantizes q / sqrt(d), k^T, v and softmax(.) with the graph's scales.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

import wanrt.export.models.wan_dit as wan_dit
from tests.calibration.helpers import (
    cosine, fake_quant, fake_quantized_module, feeds, initializers, observed_amax, rel_l2, session, torch_run,
)
from wanrt.calibration.attention_qdq import (
    SOFTMAX_SCALE, attention_sites, insert_attention_qdq, observed_inputs, quantized_sites,
)
from wanrt.calibration.qdq import WeightQuantReport, insert_activation_qdq, weight_qdq_pass, with_amax_outputs
from wanrt.export.onnx.dit import export_dit_onnx
from wanrt.export.onnx.lint import lint_onnx

CALIB_SEEDS, HELD_OUT_SEEDS = (11, 12, 13), (21, 22)
CALL_KINDS = ("self", "text", "image")  # the order a tiny i2v block calls attention in
# Stated bounds for the tiny random 1-layer i2v DiT (output vs the fp32 graph, held-out inputs); measured values printed.
MAX_REL_L2, MIN_COSINE = 3e-2, 0.9995


@pytest.fixture(scope="module")
def attn_i2v(i2v):
    """The tiny i2v DiT (conftest), its fp32 graph and its fp8 weight graph."""
    case, view, tmp, fp32 = i2v
    weights = export_dit_onnx(view, tmp / "attn_w_fp8", "fp32", cfg=case.cfg, progress=False,
                              passes=[weight_qdq_pass(view, "fp8", WeightQuantReport("fp8"))]).graph  # fmt: skip
    return case, view, fp32, weights


def calibrate(weights, case, name: str, kinds=("self",), softmax_scale: float = SOFTMAX_SCALE):
    """The fp8 weight graph calibrated on CALIB_SEEDS (linears and the `kinds` attentions), saved as `name` beside it."""
    model = onnx.load(str(weights), load_external_data=False)
    sites = quantized_sites(model, kinds)
    calib, outputs = with_amax_outputs(model, extra=observed_inputs(sites))
    calib_path = weights.with_name(f"calib_{name}")
    onnx.save(calib, str(calib_path))
    amax = observed_amax(calib_path, outputs, case, CALIB_SEEDS)
    linear = insert_activation_qdq(model, "fp8", amax)
    attention = insert_attention_qdq(model, sites, amax, softmax_scale) if sites else {}
    graph = weights.with_name(name)
    onnx.save(model, str(graph))
    return graph, linear, attention, amax


@pytest.fixture(scope="module")
def quantized(attn_i2v):
    case, _, _, weights = attn_i2v
    return calibrate(weights, case, "w8a8_attn.onnx")


@pytest.fixture(scope="module")
def linear_only(attn_i2v):
    """The same calibration without attention Q/DQ (the W8A8 baseline)."""
    case, _, _, weights = attn_i2v
    return calibrate(weights, case, "w8a8.onnx", kinds=())


def reference_attention(scales: dict[str, dict[str, float]] | None, seen: dict[str, float] | None = None):
    """softmax(q k^T / sqrt(d)) v, with fp8 fake quantization of q / sqrt(d), k^T, softmax(.) and v on the
    self-attentions when `scales` ({"q", "k", "v", "softmax"} of blocks.0.self_attn.attention) is given;
    `seen` collects max |.| of the three operands of the self-attention."""
    calls = [0]

    def attention(q, k, v, impl="native"):
        kind = CALL_KINDS[calls[0] % 3]
        calls[0] += 1
        qs, kt = q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2)
        if kind == "self" and seen is not None:
            for name, t in (("q", qs), ("k", kt), ("v", v)):
                seen[name] = max(seen.get(name, 0.0), float(t.abs().max()))
        s = scales if kind == "self" else None
        if s is not None:
            qs, kt, v = fake_quant(qs, s["q"], "fp8"), fake_quant(kt, s["k"], "fp8"), fake_quant(v, s["v"], "fp8")
        p = torch.softmax(qs @ kt, dim=-1)
        if s is not None:
            p = fake_quant(p, s["softmax"], "fp8")
        return p @ v

    return attention


def test_the_graph_expresses_three_attentions_and_only_self_attention_is_quantized(attn_i2v, quantized):
    _, _, fp32, _ = attn_i2v
    sites = attention_sites(onnx.load(str(fp32), load_external_data=False))
    assert [(s.name, s.kind) for s in sites] == [("blocks.0.self_attn.attention", "self"),
                                                ("blocks.0.cross_attn.attention", "text"),
                                                ("blocks.0.cross_attn.attention_img", "image")]  # fmt: skip
    graph, _, attention, _ = quantized
    assert set(attention) == {"blocks.0.self_attn.attention"}
    model = onnx.load(str(graph), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 12 + 4  # one per linear input, four on the self-attention

    def through_qdq(tensor: str) -> onnx.NodeProto | None:
        """The Q of `tensor -> Q -> DQ -> here`, if that is how `tensor` arrives."""
        dq = producers.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = producers.get(dq.input[0])
        return q if q is not None and q.op_type == "QuantizeLinear" else None

    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    patterns = []
    for sm in softmaxes:
        bmm1 = producers[sm.input[0]]
        assert bmm1.op_type == "MatMul"  # BMM1 -> Softmax directly (the 1/sqrt(d) is on q, before its Q)
        users = consumers[sm.output[0]]
        if users[0].op_type == "QuantizeLinear":
            dq = consumers[users[0].output[0]]
            assert [n.op_type for n in dq] == ["DequantizeLinear"]
            bmm2 = consumers[dq[0].output[0]]
        else:
            bmm2 = users
        assert [n.op_type for n in bmm2] == ["MatMul"]
        q_q, k_q, p_q, v_q = (through_qdq(t) for t in (*bmm1.input, *bmm2[0].input))
        patterns.append(tuple(x is not None for x in (q_q, k_q, p_q, v_q)))
        if q_q is not None:
            assert producers[q_q.input[0]].op_type == "Mul"  # the scaled q
            assert producers[k_q.input[0]].op_type == "Transpose"  # k^T
    assert patterns == [(True,) * 4, (False,) * 4, (False,) * 4]
    assert lint_onnx(graph) == []


def test_attention_ranges_are_those_of_the_torch_operands(attn_i2v, quantized):
    """The observed q, k, v ranges are max |q / sqrt(d)|, |k^T|, |v| of the self-attention in torch; scales are amax / 448."""
    case, view, _, weights = attn_i2v
    _, _, attention, amax = quantized
    module = fake_quantized_module(view, case.cfg, weights, "fp8", None)
    seen: dict[str, float] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wan_dit, "attention", reference_attention(None, seen))
        for seed in CALIB_SEEDS:
            torch_run(module, feeds(case, 2, (3, 6, 10), seed))
    site = "blocks.0.self_attn.attention"
    for operand in ("q", "k", "v"):
        assert amax[f"{site}.{operand}"] == pytest.approx(seen[operand], rel=1e-4), operand
        assert attention[site][operand] == pytest.approx(seen[operand] / 448.0, rel=1e-4)
    assert attention[site]["softmax"] == 1.0 / 448.0


@pytest.mark.parametrize("batch, grid", [(2, (3, 6, 10)), (1, (2, 10, 4))])
def test_graph_matches_the_fake_quantized_reference_and_stays_near_fp32(attn_i2v, quantized, linear_only, batch, grid):
    case, view, fp32, _ = attn_i2v
    graph, linear, _, _ = quantized
    inits = initializers(graph)
    site = "blocks.0.self_attn.attention"
    scales = {w: float(inits[f"{site}.{w}_scale"]) for w in ("q", "k", "v", "softmax")}  # as the graph holds them
    module = fake_quantized_module(view, case.cfg, graph, "fp8", linear)
    x = feeds(case, batch, grid, HELD_OUT_SEEDS[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wan_dit, "attention", reference_attention(scales))
        want = torch_run(module, x)
    got = session(graph, level="basic").run(None, x)[0]
    exact = rel_l2(got, want)
    assert exact < 1e-3, exact
    ref = session(fp32).run(None, x)[0]
    base = session(linear_only[0]).run(None, x)[0]
    err, cos = rel_l2(got, ref), cosine(got, ref)
    print(f"fp8 W8A8 + attention {batch}x{grid}: rel L2 vs fp32 {err:.2e}, cosine {cos:.6f} "
          f"(W8A8 alone: {rel_l2(base, ref):.2e}, {cosine(base, ref):.6f}); vs the torch reference {exact:.1e}")
    assert err < MAX_REL_L2 and cos > MIN_COSINE


def test_lint_rejects_a_partial_attention_placement(quantized, tmp_path):
    """Without the softmax output's Q/DQ (q, k, v still quantized), the graph is one TensorRT cannot fuse."""
    graph, _, _, _ = quantized
    model = onnx.load(str(graph), load_external_data=False)
    site = "blocks.0.self_attn.attention"
    dq = next(n for n in model.graph.node if n.name == f"{site}/softmax_dq")
    q = next(n for n in model.graph.node if n.name == f"{site}/softmax_q")
    for n in model.graph.node:
        n.input[:] = [q.input[0] if i == dq.output[0] else i for i in n.input]
    model.graph.node.remove(dq)
    model.graph.node.remove(q)
    partial = graph.with_name("partial.onnx")
    onnx.save(model, str(partial))
    problems = lint_onnx(partial)
    assert len(problems) == 1, problems
    assert "Q/DQ on q, k^T, v but not on softmax output" in problems[0] and "TensorRT" in problems[0]


def attention_output(graph, bmm2: str, x: dict[str, np.ndarray]) -> np.ndarray:
    """The output of the MatMul `bmm2` in ORT: the graph, with that tensor made a graph output."""
    model = onnx.load(str(graph), load_external_data=False)
    out = next(n.output[0] for n in model.graph.node if n.name == bmm2)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    probe = graph.with_name(f"probe_{graph.name}")
    onnx.save(model, str(probe))
    return session(probe).run([out], x)[0]


@pytest.mark.parametrize("grid", [(3, 6, 10), (3, 32, 48)])  # 45 and 1152 tokens
def test_softmax_scale_1_over_448_beats_modelopts_1(attn_i2v, linear_only, grid):
    """The softmax output scale decision, measured on the self-attention's output against the same graph without
    attention Q/DQ (so only the attention's quantization differs): at 1/448 the probabilities use the whole e4m3
    range; at ModelOpt's 1.0 those under 2^-10 flush to 0 and those under 2^-6 lose mantissa bits."""
    case, _, fp32, weights = attn_i2v
    x = feeds(case, 1, grid, HELD_OUT_SEEDS[0])
    model = onnx.load(str(linear_only[0]), load_external_data=False)
    bmm2 = next(s.bmm2 for s in attention_sites(model) if s.kind == "self")  # node names are the export's
    ref = attention_output(linear_only[0], bmm2, x)
    ref_out, fp32_out = session(linear_only[0]).run(None, x)[0], session(fp32).run(None, x)[0]
    errors = {}
    for scale in (1.0 / 448.0, 1.0):
        graph = calibrate(weights, case, f"softmax_{scale:g}.onnx", softmax_scale=scale)[0]
        got = attention_output(graph, bmm2, x)
        out = session(graph).run(None, x)[0]
        errors[scale] = (rel_l2(got, ref), cosine(got, ref), rel_l2(out, ref_out), rel_l2(out, fp32_out))
    tokens = grid[0] * grid[1] * grid[2] // 4
    for scale, (err, cos, out_err, fp32_err) in errors.items():
        print(f"{tokens} tokens, softmax scale {'1/448' if scale < 1 else '1.0'}: attention output rel L2 {err:.2e}, "
              f"cosine {cos:.6f}; DiT output rel L2 {out_err:.2e} vs W8A8 alone, {fp32_err:.2e} vs fp32")
    assert errors[1 / 448][0] < errors[1.0][0]


def test_a_bf16_graph_gets_bf16_attention_scales_and_lints(attn_i2v, tmp_path):
    """TensorRT's strong typing: the scales are in the activations' dtype (bf16: the 16-bit attention inputs
    ModelOpt's fused fp8 attention needs).  ORT's CPU provider has no bf16 MatMul, so this checks the graph only."""
    case, view, _, _ = attn_i2v
    graph = export_dit_onnx(view, tmp_path / "bf16", "bf16", cfg=case.cfg, progress=False,
                            passes=[weight_qdq_pass(view, "fp8", WeightQuantReport("fp8"))]).graph  # fmt: skip
    model = onnx.load(str(graph), load_external_data=False)
    sites = quantized_sites(model)
    amax = {key: 2.0 for keys in observed_inputs(sites).values() for key in keys}
    scales = insert_attention_qdq(model, sites, amax)
    assert scales == {"blocks.0.self_attn.attention": {"q": 2.0 / 448, "k": 2.0 / 448, "v": 2.0 / 448, "softmax": 1 / 448}}
    inits = {t.name: t for t in model.graph.initializer}
    for what in ("q", "k", "v", "softmax"):
        scale = inits[f"blocks.0.self_attn.attention.{what}_scale"]
        assert scale.data_type == onnx.TensorProto.BFLOAT16 and list(scale.dims) == []
        assert inits[f"blocks.0.self_attn.attention.{what}_zero_point"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    out = graph.with_name("attn.onnx")
    onnx.save(model, str(out))
    assert lint_onnx(out) == []
