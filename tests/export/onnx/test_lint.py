"""lint_onnx / `cli.py lint-onnx`: clean graphs pass, each crafted TensorRT-incompatibility is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from wanrt.engines.signatures import EngineSignature, TensorSpec
from wanrt.export.onnx.lint import TRT_OPS_FILE, load_trt_op_support, lint_onnx, parse_trt_operator_table

REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO.parent / "shared" / "reference" / "onnx-tensorrt-operators-10.1.md"
SIG = EngineSignature(
    (TensorSpec("x", "float32", ("batch", 4)),),
    (TensorSpec("y", "float32", ("batch", 4)),),
    {"batch": (1, 2)},
)


def save(model: onnx.ModelProto, path: Path, external: bool = True) -> Path:
    """Save with every initializer in one external data file beside the model."""
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


def graph_model(nodes, inits=(), x_shape=("batch", 4), y_shape=("batch", 4), opset=19, domains=(), y_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", y_type, list(y_shape))],
        initializer=list(inits),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def clean_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    return graph_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)], [w])


def test_data_is_the_reference_table():
    if not REFERENCE.is_file():
        pytest.skip(f"reference {REFERENCE} not present")
    data = json.loads(TRT_OPS_FILE.read_text())
    parsed = parse_trt_operator_table(REFERENCE.read_text())
    assert data["supported"] == parsed["supported"]
    assert data["unsupported"] == parsed["unsupported"]
    assert data["opset_range"] == parsed["opset_range"] == [9, 20]
    assert "96e7811" in data["source"]


def test_support_list_facts():
    support = load_trt_op_support()
    assert {"MatMul", "Softmax", "LayerNormalization", "Conv", "Range", "Expand"} <= set(support.supported)
    assert "Attention" not in support.supported and support.added_later["Attention"]["tensorrt"] == "10.14"
    assert support.added_later["RMSNormalization"]["tensorrt"] == "10.15"
    assert "Unique" in support.unsupported and "Unique" not in support.supported
    assert support.supported["Squeeze"]["restrictions"] == "`axes` must be an initializer"


def test_clean_graph_passes(tmp_path):
    assert lint_onnx(save(clean_model(), tmp_path / "m.onnx"), SIG) == []


def problems_of(model: onnx.ModelProto, tmp_path: Path, signature=SIG, **kw) -> list[str]:
    return lint_onnx(save(model, tmp_path / "m.onnx", **kw), signature)


def test_unsupported_and_later_ops(tmp_path):
    m = graph_model([helper.make_node("Unique", ["x"], ["u"]), helper.make_node("Identity", ["x"], ["y"])])
    assert any("op Unique is not supported by TensorRT 10.1" in p for p in problems_of(m, tmp_path))
    q = graph_model([helper.make_node("Reshape", ["x", "s"], ["q"]), helper.make_node("Attention", ["q", "q", "q"], ["a"]),
                     helper.make_node("Reshape", ["a", "s2"], ["y"])],
                    [numpy_helper.from_array(np.array([1, 1, -1, 4], np.int64), "s"),
                     numpy_helper.from_array(np.array([-1, 4], np.int64), "s2")], opset=23)
    problems = problems_of(q, tmp_path)
    assert any("op Attention is not supported by TensorRT 10.1's ONNX parser (supported from TensorRT 10.14)" in p for p in problems)
    assert any("opset 23: TensorRT 10.1's ONNX parser supports opsets 9 to 20" in p for p in problems)


def test_only_our_custom_op(tmp_path):
    ours = graph_model([helper.make_node("WanAttention", ["x", "x", "x"], ["y"], domain="wanrt", scale=0.5,
                                         plugin_version="1", plugin_namespace="wanrt")], domains=["wanrt"])
    assert problems_of(ours, tmp_path) == []
    other = graph_model([helper.make_node("FusedThing", ["x"], ["y"], domain="com.vendor")], domains=["com.vendor"])
    problems = problems_of(other, tmp_path)
    assert any("custom op com.vendor::FusedThing needs a TensorRT plugin that is not ours" in p for p in problems)
    wrong_name = graph_model([helper.make_node("Attention", ["x", "x", "x"], ["y"], domain="wanrt")], domains=["wanrt"])
    assert any("custom op wanrt::Attention" in p for p in problems_of(wrong_name, tmp_path))


def test_axes_must_be_an_initializer(tmp_path):
    m = graph_model([
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "two"], ["axes"]),  # computed at runtime
        helper.make_node("Sub", ["axes", "one"], ["axes0"]),
        helper.make_node("Unsqueeze", ["x", "axes0"], ["u"]),
        helper.make_node("Squeeze", ["u", "zero"], ["y"]),
    ], [numpy_helper.from_array(np.array([1], np.int64), n) for n in ("one",)]
       + [numpy_helper.from_array(np.array([2], np.int64), "two"), numpy_helper.from_array(np.array([0], np.int64), "zero")],
       x_shape=(1, 4), y_shape=(1, 4))
    problems = problems_of(m, tmp_path, signature=None)
    assert any("Unsqueeze `axes` input 'axes0' must be an initializer" in p for p in problems)
    assert not any("Squeeze `axes`" in p for p in problems)


def test_op_types_must_be_in_the_tensorrt_list(tmp_path):
    """Clip/MatMul on int64 are not in TensorRT 10.1's type list; index, condition and bool result types are not held to it."""
    inits = [numpy_helper.from_array(np.array([3, 2, 1, 0], np.int64), "idx"),
             numpy_helper.from_array(np.array(0, np.int64), "lo"), numpy_helper.from_array(np.array(2, np.int64), "hi"),
             numpy_helper.from_array(np.ones((4, 4), np.int64), "m")]  # fmt: skip
    m = graph_model([
        helper.make_node("Gather", ["x", "idx"], ["g"], axis=1, name="gather"),  # fp32 data, int64 indices
        helper.make_node("Greater", ["g", "x"], ["b"], name="greater"),  # fp32 in, bool out
        helper.make_node("Where", ["b", "g", "x"], ["y"], name="where"),  # bool condition, fp32 values
        helper.make_node("Clip", ["idx", "lo", "hi"], ["clipped"], name="clamp_ids"),  # torch.clamp on indices
        helper.make_node("MatMul", ["m", "m"], ["mm"], name="int_matmul"),
        helper.make_node("MatMul", ["m", "m"], ["mm2"], name="int_matmul_again"),  # one line per op and type
    ], inits)
    assert problems_of(m, tmp_path) == [
        "node clamp_ids: Clip on int64 tensor 'idx'; TensorRT 10.1's ONNX parser supports Clip on FP32, FP16, BF16",
        "node int_matmul: MatMul on int64 tensor 'm'; TensorRT 10.1's ONNX parser supports MatMul on FP32, FP16, BF16",
    ]


def test_float64_and_unnamed_dims(tmp_path):
    d = numpy_helper.from_array(np.ones(4, np.float64), "d")
    m = graph_model([helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "df"], ["y"])], [d],
                    x_shape=(None, 4), y_shape=(None, 4))
    problems = problems_of(m, tmp_path, signature=None)
    assert any("initializer 'd': float64" in p for p in problems)
    assert any("input x: unnamed dynamic dim" in p for p in problems)


def test_dims_must_be_the_signature_ones(tmp_path):
    static_batch = graph_model([helper.make_node("Identity", ["x"], ["y"])], x_shape=(2, 4), y_shape=(2, 4))
    problems = problems_of(static_batch, tmp_path)
    assert "input x: dim 0 is 2, the signature declares dynamic 'batch'" in problems
    extra_dynamic = graph_model([helper.make_node("Identity", ["x"], ["y"])], x_shape=("batch", "feat"), y_shape=("batch", "feat"))
    assert "output y: dim 1 is dynamic 'feat', the signature declares 4" in problems_of(extra_dynamic, tmp_path)
    renamed = graph_model([helper.make_node("Identity", ["x"], ["z"]), helper.make_node("Identity", ["z"], ["y"])])
    renamed.graph.output[0].name = "z"
    renamed.graph.node.pop()
    assert "outputs ['z'], the signature declares ['y']" in problems_of(renamed, tmp_path)
    wrong_type = graph_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)], y_type=TensorProto.FLOAT16)
    assert "output y: dtype float16, the signature declares float32" in problems_of(wrong_type, tmp_path)


def test_checker_failure_is_reported(tmp_path):
    bad = graph_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                      [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])  # [batch,4] @ [3,4]
    problems = problems_of(bad, tmp_path)
    assert any(p.startswith("onnx.checker:") for p in problems)


def test_external_data_problems(tmp_path):
    path = save(clean_model(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])  # truncated
    assert any("holds 10 bytes; the initializers need 64" in p for p in lint_onnx(path, SIG))
    data.unlink()
    assert any("m.onnx.data is missing" in p for p in lint_onnx(path, SIG))


def test_initializer_over_2gib(tmp_path):
    model = clean_model()
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 29 | 1])  # 2 GiB + 4 bytes, external
    big.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "m.onnx.data"), ("offset", "0"), ("length", str((1 << 31) + 4))):
        big.external_data.add(key=k, value=v)
    save(model, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    model.graph.initializer.append(big)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    with open(tmp_path / "m.onnx.data", "r+b") as f:  # sparse: no real disk use
        f.truncate((1 << 31) + 4)
    problems = lint_onnx(tmp_path / "m.onnx", SIG)
    assert "initializer 'big': 2.00 GiB, more than TensorRT's 2 GiB per weight" in problems


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "cli.py"), "lint-onnx", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_exit_codes_and_json(tmp_path):
    clean = save(clean_model(), tmp_path / "clean.onnx")
    sig = tmp_path / "sig.json"
    sig.write_text(json.dumps(SIG.to_dict()))
    r = run_cli(str(clean), "--signature", str(sig))
    assert r.returncode == 0 and "OK for TensorRT 10.1" in r.stdout
    bad = save(graph_model([helper.make_node("Unique", ["x"], ["u"]), helper.make_node("Identity", ["x"], ["y"])]), tmp_path / "bad.onnx")
    r = run_cli(str(bad), "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False and any("Unique" in p for p in report["problems"]) and report["signature_checked"] is False
    r = run_cli(str(tmp_path / "absent.onnx"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "absent.onnx" in r.stderr
    sig.write_text("{}")
    r = run_cli(str(clean), "--signature", str(sig))
    assert r.returncode == 2 and "not an engine signature JSON" in r.stderr


def test_cli_takes_the_signature_from_the_bundle(tmp_path):
    from wanrt.engines.manifest import Component, Manifest, write_manifest
    from wanrt.engines.model import DiTConfig, SamplingDefaults, VAEInfo

    bundle = tmp_path / "bundle"
    (bundle / "dit").mkdir(parents=True)
    save(clean_model(), bundle / "dit" / "model.onnx")
    wider = EngineSignature((TensorSpec("x", "float32", ("batch", 8)),), SIG.outputs, SIG.dim_ranges)
    comp = Component("dit", "dit", "dit/model.onnx", wider, "fp32", files=["dit/model.onnx", "dit/model.onnx.data"])
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_dim=16, out_dim=16)
    write_manifest(bundle, Manifest("wan2.1", "t2v", cfg, VAEInfo.for_version("2.1"), {"dit": comp}, SamplingDefaults()))
    r = run_cli(str(bundle / "dit" / "model.onnx"), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["signature_checked"] is True
    assert report["problems"] == ["input x: dim 1 is static 4, the signature declares 8"]


# ---- explicit quantization (tensorrt.md §3: symmetric, constant scales; fp8 from opset 19) ----


def qdq_model(*, w_scale=None, w_zero=None, x_scale=0.02, x_zero=0, axis=1, code=TensorProto.INT8, opset=19,
              x_dq_feeds="MatMul", scale_as_input=False) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(., DQ(W codes, per-channel scale on `axis`)) -> y, with the given defects."""
    codes = helper.make_tensor("w", code, [4, 4], np.eye(4).astype(np.float32).ravel().tolist() if code != TensorProto.INT8
                               else np.eye(4, dtype=np.int8).ravel().tolist())
    ws = np.full(4, 0.5, np.float32) if w_scale is None else np.asarray(w_scale, np.float32)
    wz = np.zeros(4) if w_zero is None else np.asarray(w_zero)
    inits = [codes, numpy_helper.from_array(ws, "ws"), helper.make_tensor("wz", code, list(wz.shape), wz.astype(np.float32).tolist()),
             helper.make_tensor("xz", code, [], [float(x_zero)])]
    if not scale_as_input:
        inits.append(numpy_helper.from_array(np.array(x_scale, np.float32), "xs"))
    nodes = [] if not scale_as_input else [helper.make_node("ReduceMax", ["x"], ["xs"], keepdims=0)]
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq", axis=axis),
    ]
    if x_dq_feeds == "MatMul":
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
    else:  # the quantized activation also feeds the residual add
        nodes += [helper.make_node("MatMul", ["xd", "wd"], ["h"]), helper.make_node("Add", ["h", "xd"], ["y"])]
    return graph_model(nodes, inits, opset=opset)


def test_clean_qdq_graphs_pass(tmp_path):
    assert problems_of(qdq_model(), tmp_path) == []
    assert problems_of(qdq_model(code=TensorProto.FLOAT8E4M3FN), tmp_path) == []


@pytest.mark.parametrize("kw, needle", [
    ({"x_zero": 3}, "zero point 'xz' is not 0"),
    ({"w_zero": [0, 1, 0, 0]}, "zero point 'wz' is not 0"),
    ({"x_scale": -0.1}, "scale 'xs' must be positive and finite"),
    ({"x_scale": float("inf")}, "scale 'xs' must be positive and finite"),
    ({"w_scale": [0.5, 0.0, 0.5, 0.5]}, "scale 'ws' must be positive and finite"),
    ({"w_scale": [0.5, 0.5, 0.5]}, "3 per-channel scales for axis 1"),
    ({"axis": 2}, "axis 2 is outside the rank 2"),
    ({"scale_as_input": True}, "scale 'xs' is not an initializer"),
    ({"x_dq_feeds": "Add"}, "a quantized activation feeds Add"),
    ({"code": TensorProto.FLOAT8E4M3FN, "opset": 18}, "float8 Q/DQ needs opset 19"),
])
def test_each_qdq_defect_is_named(tmp_path, kw, needle):
    problems = problems_of(qdq_model(**kw), tmp_path)
    assert any(needle in p for p in problems), problems


def test_quantize_must_feed_dequantize(tmp_path):
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="lonely_q"),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)]
    problems = problems_of(graph_model(nodes, inits), tmp_path)
    assert any("lonely_q" in p and "must feed DequantizeLinear only" in p for p in problems), problems
