"""export_onnx: names, dynamic dims, one external data file, meta tracing with streamed weights, graph passes."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wanrt.engines.signatures import EngineSignature, TensorSpec
from wanrt.export.onnx.component import ExportError
from wanrt.export.onnx.torch_to_onnx import export_onnx, name_io_dims, quiet_exporter_noise

REPO = Path(__file__).resolve().parents[3]

SIG = EngineSignature(
    (TensorSpec("x", "float32", ("batch", "tokens", 8)), TensorSpec("bias", "float32", (4,))),
    (TensorSpec("y", "float32", ("batch", "tokens", 4)),),
    {"batch": (1, 2), "tokens": (1, 64)},
)


class Tiny(torch.nn.Module):
    """Linear -> scale -> linear, plus a position ramp built from the dynamic token count."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 512)
        self.gain = torch.nn.Parameter(torch.randn(512))
        self.down = torch.nn.Linear(512, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)[None, :, None]
        return self.down(self.up(x) * self.gain) + pos + bias


def _reference(module: torch.nn.Module, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The same math in numpy from the module's weights."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    h = (x @ sd["up.weight"].T + sd["up.bias"]) * sd["gain"]
    return h @ sd["down.weight"].T + sd["down.bias"] + np.arange(x.shape[1], dtype=np.float32)[None, :, None] + bias


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    module = Tiny().eval()
    out_dir = tmp_path_factory.mktemp("onnx") / "tiny"
    exported = export_onnx(module, {"x": torch.randn(2, 5, 8), "bias": torch.randn(4)}, out_dir, SIG, progress=False)
    return module, out_dir / "model.onnx", exported


def test_writes_model_and_one_data_file(exported):
    _, out, exported = exported
    assert exported.files == [out, out.parent / "model.onnx.data"] and exported.graph == out
    assert exported.signature == SIG and exported.attributes == {}
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp left
    m = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    big = {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {"up.weight", "down.weight", "gain"} <= big
    assert max(op.version for op in m.opset_import if op.domain in ("", "ai.onnx")) >= 19


def test_io_names_and_dynamic_dims(exported):
    _, out, _ = exported
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("x", ["batch", "tokens", 8]), ("bias", [4])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("y", ["batch", "tokens", 4])]


@pytest.mark.parametrize("shape", [(1, 3), (2, 17)])
def test_ort_matches_reference_at_two_shapes(exported, shape):
    module, out, _ = exported
    rng = np.random.default_rng(1)
    x = rng.standard_normal((*shape, 8), dtype=np.float32)
    bias = rng.standard_normal(4, dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x, "bias": bias})
    np.testing.assert_allclose(y, _reference(module, x, bias), rtol=1e-5, atol=1e-5)


def test_meta_module_with_streamed_weights(tmp_path, exported):
    module, _, _ = exported
    with torch.device("meta"):
        meta = Tiny().eval()
    sd = module.state_dict()
    loads: list[str] = []

    def loader(name):
        def load():
            loads.append(name)
            return sd[name]
        return load

    out = tmp_path / "meta" / "model.onnx"
    export_onnx(meta, {"x": torch.empty(2, 5, 8, device="meta"), "bias": torch.empty(4, device="meta")}, out.parent, SIG,
                weights={k: loader(k) for k in sd}, progress=False)
    assert set(loads) == set(sd)
    assert loads.count("up.weight") == loads.count("down.weight") == 1  # big weights: read once, when written
    x = np.ones((1, 2, 8), np.float32)
    bias = np.zeros(4, np.float32)
    (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x, "bias": bias})
    np.testing.assert_allclose(y, _reference(module, x, bias), rtol=1e-5, atol=1e-5)
    # initializer names stay the parameter names (no folded/transposed copies)
    names = {t.name for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert set(sd) <= names


def test_meta_module_without_weights_is_refused_and_leaves_nothing(tmp_path):
    with torch.device("meta"):
        meta = Tiny().eval()
    with pytest.raises(ExportError, match="no weight data for initializers"):
        export_onnx(meta, {"x": torch.empty(2, 5, 8, device="meta"), "bias": torch.empty(4, device="meta")},
                    tmp_path / "m", SIG, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_weight_shape_is_named(tmp_path):
    with torch.device("meta"):
        meta = Tiny().eval()
    sd = Tiny().state_dict()
    sd["gain"] = torch.zeros(3)
    with pytest.raises(ExportError, match="'gain'"):
        export_onnx(meta, {"x": torch.empty(2, 5, 8, device="meta"), "bias": torch.empty(4, device="meta")},
                    tmp_path / "m", SIG, weights={k: (lambda k=k: sd[k]) for k in sd}, progress=False)
    assert list(tmp_path.iterdir()) == []  # the folder the export made is gone too


def test_example_inputs_must_fit_the_signature(tmp_path):
    with pytest.raises(ExportError, match=r"example input bias: shape \[5\], expected \[4\] \(dim 0 is 5, not 4\)"):
        export_onnx(Tiny(), {"x": torch.randn(2, 5, 8), "bias": torch.randn(5)}, tmp_path / "m", SIG, progress=False)
    with pytest.raises(ExportError, match=r"example inputs missing \['bias'\]; expected \['x', 'bias'\]"):
        export_onnx(Tiny(), {"x": torch.randn(2, 5, 8)}, tmp_path / "m", SIG, progress=False)
    with pytest.raises(ExportError, match=r"example input x: dim batch=3 is outside the range 1\.\.2"):
        export_onnx(Tiny(), {"x": torch.randn(3, 5, 8), "bias": torch.randn(4)}, tmp_path / "m", SIG, progress=False)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(Tiny(), {"x": torch.randn(2, 5, 8), "bias": torch.randn(4)}, tmp_path / "m", SIG, opset=17, progress=False)
    assert list(tmp_path.iterdir()) == []


def _identity_like_graph(x_shape: list, y_shape: list) -> "onnx_ir.Model":
    """A hand-made graph y = MatMul(x, w) + bias with the given I/O shapes (ints fixed, strings symbolic)."""
    import onnx_ir
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape), helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], [w],
    )  # fmt: skip
    return onnx_ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))


def test_name_io_dims_names_symbolic_dims_and_refuses_a_fixed_dim_declared_dynamic():
    model = _identity_like_graph(["s0", "s1", 8], ["s0", "s1", 4])
    name_io_dims(model, SIG)
    assert [list(v.shape) for v in model.graph.inputs][0] == ["batch", "tokens", 8]
    assert list(model.graph.outputs[0].shape) == ["batch", "tokens", 4]
    specialized = _identity_like_graph(["s0", 5, 8], ["s0", 5, 4])  # traced with the token count baked in
    with pytest.raises(ExportError, match=r"x: dim 1 is fixed at 5 in the traced graph .* declares it dynamic 'tokens'"):
        name_io_dims(specialized, SIG)


def test_graph_passes_rewrite_the_named_graph_before_it_is_written(tmp_path, exported):
    """A pass sees the signature's dim names and its rewrite (here y -> 2 y) is what ONNX Runtime runs."""
    import onnx_ir as ir

    module, _, _ = exported
    seen = []

    def double_output(model: ir.Model) -> None:
        graph = model.graph
        seen.append([list(v.shape) for v in graph.inputs])
        y = graph.outputs[0]
        two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32)))
        graph.register_initializer(two)
        mul = ir.Node("", "Mul", [y, two], num_outputs=1)
        graph.append(mul)
        doubled = mul.outputs[0]
        doubled.shape, doubled.dtype = y.shape, y.dtype
        y.name, doubled.name = "y_once", "y"
        graph.outputs[0] = doubled

    x, bias = torch.randn(2, 5, 8), torch.randn(4)
    out = export_onnx(module, {"x": x, "bias": bias}, tmp_path / "doubled", SIG, passes=[double_output], progress=False)
    assert seen == [[["batch", "tokens", 8], [4]]]
    (y,) = ort.InferenceSession(str(out.graph), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy(), "bias": bias.numpy()})
    np.testing.assert_allclose(y, 2 * _reference(module, x.numpy(), bias.numpy()), rtol=1e-5, atol=1e-5)


class Collect(logging.Handler):
    """Keeps the formatted messages a logger hands to its handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_exporter_noise_drops_only_the_named_messages_and_only_inside():
    """The exporter's torchvision / axis-name / treespec lines go; other messages, other categories and later ones stay."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    collect = Collect()
    registration.addHandler(collect)
    axis = "# The axis name: width will not be used, since it shares the same shape constraints with another axis: width."
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_exporter_noise():
                registration.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
                registration.warning("Skipping constant argument %s", "scale")  # the same logger, another message
                warnings.warn(axis, UserWarning)
                warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()`", FutureWarning)
                warnings.warn(axis, FutureWarning)  # the named text in another category
                warnings.warn("weight 'gain' is not finite", UserWarning)
            registration.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")
            warnings.warn(axis, UserWarning)
    finally:
        registration.removeHandler(collect)
    assert collect.messages == ["Skipping constant argument scale", "torchvision is not installed. Skipping torchvision::roi_align"]
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, axis), (UserWarning, "weight 'gain' is not finite"), (UserWarning, axis),
    ]


# A module traced with derived dims (2 * Dim), as the DiT is: torch.export's own record of its symbols'
# ranges comes in hash order, which made two processes write different graphs for the same export.
PATCHED_MEAN = """
import sys
import cli
import torch
from wanrt.engines.signatures import EngineSignature, TensorSpec
from wanrt.export.onnx.torch_to_onnx import export_onnx

shape = ("batch", 4, "frames", "height", "width")
sig = EngineSignature((TensorSpec("x", "float32", shape),), (TensorSpec("y", "float32", shape),),
                      {"batch": (1, 2), "frames": (1, 31), "height": (2, 192), "width": (2, 192)})

class PatchedMean(torch.nn.Module):
    def forward(self, x):
        b, c, f, h, w = x.shape
        patches = x.reshape(b, c, f, h // 2, 2, w // 2, 2)
        return (patches - patches.mean((4, 6), keepdim=True)).reshape(b, c, f, h, w)

dims = {axis: 2 * torch.export.Dim(axis + "_patches", min=1, max=96) for axis in ("height", "width")}
export_onnx(PatchedMean(), {"x": torch.zeros(2, 4, 3, 6, 10)}, sys.argv[1], sig, dynamic_dims=dims, progress=False)
"""


def test_the_same_export_writes_the_same_bytes_in_any_process(tmp_path):
    """Two processes with different string hashing (PYTHONHASHSEED 1 and 2 ordered the record differently) agree."""
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        subprocess.run([sys.executable, "-c", PATCHED_MEAN, str(out)], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})  # fmt: skip
        digests.append([hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("model.onnx", "model.onnx.data")])
    assert digests[0] == digests[1]
