"""DiT experts exported to ONNX: ONNX Runtime equals the torch module at two shapes of one export.

Exports are traced on meta with weights streamed from an official-layout safetensors file
(1-layer tiny models keep the test fast; the block math is the same at any depth).  Variants:
Wan2.1 t2v, i2v (257 CLIP tokens) and flf2v (514, bf16), Wan2.2 i2v-A14B (36 channels, no CLIP),
ti2v (per-frame timesteps), and Wan2.1-VACE (2 layers, VACE blocks at 0 and 1; `vace_context` and
`context_scale` inputs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from wanrt.export.models.wan_dit import load_dit
from wanrt.export.onnx.bf16 import bf16_as_fp32
from wanrt.export.onnx.component import ExportError
from wanrt.export.onnx.dit import export_dit_onnx
from wanrt.export.onnx.lint import lint_onnx
from wanrt.plugins_trt import onnx_op
from tests.export.models.dit_cases import CASES, diffusers_model, make_inputs, official_state, rel_err, write_official

SHAPES = [(2, (3, 6, 10)), (1, (2, 10, 4))]  # (batch, latent grid) run against one export


class CountingView(dict):
    """A view wrapper that records every `load` (to prove each weight is read once)."""

    def __init__(self, view):
        super().__init__({k: view[k] for k in view})
        self.view, self.loads = view, Counter()

    def load(self, key, dtype=torch.float32):
        self.loads[key] += 1
        return self.view.load(key, dtype)


def one_layer_view(name: str, tmp_path):
    case = CASES[name]
    cfg = replace(case.cfg, num_layers=1)
    if cfg.vace:  # two layers so that the second VACE block (no before_proj) is in the graph too
        cfg = replace(cfg, num_layers=2, vace_layers=(0, 1))
    model = diffusers_model(replace(case, cfg=cfg), seed=7)
    return cfg, write_official(official_state(model), tmp_path / "dit.safetensors")


# The bf16 export comes first: the bf16-only test's indirect parameter has index 0, which pytest's
# ordering matches to the fixture's own index 0, so it runs on that export instead of a second one.
EXPORTS = [("flf2v", "bf16"), ("t2v", "fp32"), ("i2v", "fp32"), ("i2v_a14b", "fp32"), ("ti2v", "fp32"), ("vace", "fp32")]
BF16_EXPORTS = [e for e in EXPORTS if e[1] == "bf16"]


def export_id(param: tuple[str, str]) -> str:
    return "-".join(param)


@pytest.fixture(scope="module", params=EXPORTS, ids=export_id)
def exported(request, tmp_path_factory):
    name, precision = request.param
    tmp = tmp_path_factory.mktemp(f"{name}_{precision}")
    cfg, view = one_layer_view(name, tmp)
    counting = CountingView(view)
    files = export_dit_onnx(counting, tmp / "dit", precision, cfg=cfg, progress=False).files
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return name, precision, cfg, counting, files, load_dit(view, cfg, dtype=dtype)


def ort_session(path, precision: str) -> ort.InferenceSession:
    if precision == "bf16":  # ONNX Runtime has no bf16 CPU kernels: run the graph with bf16 values in fp32
        return ort.InferenceSession(bf16_as_fp32(onnx.load(str(path))).SerializeToString(), providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_files_signature_and_lint(exported):
    name, precision, cfg, _, files, module = exported
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in files[0].parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert lint_onnx(files[0], module.signature) == []
    sess = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]) if precision == "fp32" else None
    if sess is not None:
        got = [(i.name, i.shape) for i in sess.get_inputs()]
        want = [(s.name, list(s.shape)) for s in module.signature.inputs]
        assert got == want
    timestep = module.signature.input("timestep").shape
    assert timestep == (("batch", "frames") if name == "ti2v" else ("batch",))


def test_each_weight_read_once_under_its_official_name(exported):
    _, _, _, counting, files, _ = exported
    m = onnx.load(str(files[0]), load_external_data=False)
    names = {t.name for t in m.graph.initializer}
    assert set(counting) <= names  # initializers keep the official keys
    big = [k for k in counting if len(counting.view[k].shape) == 2]
    assert all(counting.loads[k] == 1 for k in big), {k: counting.loads[k] for k in big if counting.loads[k] != 1}


def test_weight_dtypes(exported):
    """fp32 exports hold no bf16; bf16 exports store the big linears in bf16 and keep the fp32 islands."""
    _, precision, _, _, files, _ = exported
    dtypes = {t.name: t.data_type for t in onnx.load(str(files[0]), load_external_data=False).graph.initializer}
    bf16, fp32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    if precision == "fp32":
        assert bf16 not in dtypes.values()
        return
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["blocks.0.ffn.0.weight"] == dtypes["blocks.0.cross_attn.k_img.weight"] == bf16
    assert dtypes["blocks.0.modulation"] == dtypes["time_embedding.0.weight"] == dtypes["head.head.weight"] == fp32
    assert dtypes["blocks.0.self_attn.norm_q.weight"] == dtypes["img_emb.emb_pos"] == fp32


@pytest.mark.parametrize("batch,grid", SHAPES)
def test_onnxruntime_matches_torch(exported, batch, grid):
    name, precision, cfg, _, files, module = exported
    case = replace(CASES[name], cfg=cfg)
    inputs = make_inputs(case, batch, grid, seed=11)
    (got,) = ort_session(files[0], precision).run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = module(*inputs.values())
    assert got.shape == tuple(want.shape) == (batch, cfg.out_dim, *grid)
    assert rel_err(torch.from_numpy(got), want) < (2e-2 if precision == "bf16" else 1e-4)


class Softmax(OpRun):
    """ONNX Softmax that sums in float32 and rounds its result to the input dtype, as GPU bf16 kernels do.

    The reference evaluator's own Softmax sums bf16 values in bf16 (numpy), which alone puts a
    1-layer flf2v output 4% off torch bf16 (1026 keys per row); with this it is 0.2% off.
    """

    op_domain = ""

    def _run(self, x, axis=-1):
        f = x.astype(np.float32)
        e = np.exp(f - f.max(axis=axis, keepdims=True))
        return ((e / e.sum(axis=axis, keepdims=True)).astype(x.dtype),)


@pytest.mark.parametrize("exported", BF16_EXPORTS, ids=export_id, indirect=True)
def test_bf16_graph_as_exported_follows_torch_bf16(exported):
    """The bf16 graph itself (bf16 weights and ops, no bf16_as_fp32 rewrite), run by ONNX's reference evaluator."""
    name, precision, cfg, _, files, module = exported
    assert precision == "bf16"
    inputs = make_inputs(replace(CASES[name], cfg=cfg), 1, (2, 4, 4), seed=13)
    (got,) = ReferenceEvaluator(str(files[0]), new_ops=[Softmax]).run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = module(*inputs.values())
    assert got.dtype == np.float32 and got.shape == tuple(want.shape) == (1, cfg.out_dim, 2, 4, 4)
    assert rel_err(torch.from_numpy(got), want) < 2e-2


def test_native_attention_is_the_pattern_tensorrt_fuses(exported):
    """Every Softmax sits between two MatMuls, the first fed by Q already multiplied by the scale."""
    _, _, cfg, _, files, _ = exported
    graph = onnx.load(str(files[0]), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == cfg.num_layers * (3 if cfg.image_branch else 2) + 2 * len(cfg.vace_layers)
    for sm in softmaxes:
        bmm1 = producer[sm.input[0]]
        assert bmm1.op_type == "MatMul" and producer[bmm1.input[0]].op_type == "Mul"
        assert [c.op_type for c in consumers[sm.output[0]]] == ["MatMul"]


def test_plugin_attention_emits_our_node(tmp_path):
    cfg, view = one_layer_view("t2v", tmp_path)
    files = export_dit_onnx(view, tmp_path / "plugin", cfg=cfg, attention="plugin", progress=False).files
    m = onnx.load(str(files[0]), load_external_data=False)
    nodes = [n for n in m.graph.node if n.domain == onnx_op.DOMAIN]
    assert [n.op_type for n in nodes] == [onnx_op.OP_TYPE] * 2  # self- and cross-attention of the one block
    assert "Softmax" not in {n.op_type for n in m.graph.node}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"scale": pytest.approx(128 ** -0.5), "plugin_version": b"1", "plugin_namespace": b"wanrt"}
    assert {(o.domain, o.version) for o in m.opset_import} >= {(onnx_op.DOMAIN, onnx_op.OPSET_VERSION)}
    assert lint_onnx(files[0], load_dit(view, cfg).signature) == []
    with pytest.raises(Exception, match="WanAttention"):
        ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])


def test_plugin_op_eager_math_is_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5 + i, 16, generator=g) for i in range(3))
    k, v = k[:, :, :6], v[:, :, :6]
    q = q[:, :, :5]
    want = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    torch.testing.assert_close(onnx_op.plugin_attention(q, k, v, 0.25), want)


def test_bad_precision_and_attention_are_refused(tmp_path):
    cfg, view = one_layer_view("t2v", tmp_path)
    with pytest.raises(ExportError, match="unsupported DiT precision 'fp16'"):
        export_dit_onnx(view, tmp_path / "x", "fp16", cfg=cfg, progress=False)
    with pytest.raises(Exception, match="unknown attention implementation 'flash'"):
        export_dit_onnx(view, tmp_path / "x", cfg=cfg, attention="flash", progress=False)
    assert not (tmp_path / "x").exists()


def test_vace_bf16_graph_lints_and_follows_torch_bf16_at_two_shapes(tmp_path):
    """VACE blocks' linears in bf16 with the fp32 islands (vace_patch_embedding, norms, modulation) as the main blocks'."""
    cfg, view = one_layer_view("vace", tmp_path)
    files = export_dit_onnx(view, tmp_path / "dit", "bf16", cfg=cfg, progress=False).files
    module = load_dit(view, cfg, dtype=torch.bfloat16)
    assert lint_onnx(files[0], module.signature) == []
    dtypes = {t.name: t.data_type for t in onnx.load(str(files[0]), load_external_data=False).graph.initializer}
    assert dtypes["vace_blocks.1.after_proj.weight"] == dtypes["vace_blocks.0.before_proj.weight"] == onnx.TensorProto.BFLOAT16
    assert dtypes["vace_patch_embedding.weight"] == dtypes["vace_blocks.0.modulation"] == onnx.TensorProto.FLOAT
    session = ort_session(files[0], "bf16")
    for batch, grid in SHAPES:
        inputs = make_inputs(replace(CASES["vace"], cfg=cfg), batch, grid, seed=17)
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            want = module(*inputs.values())
        assert rel_err(torch.from_numpy(got), want) < 2e-2
