"""`--quantize-text-encoder`: the weight-only Q/DQ umt5 graph in ONNX Runtime, against transformers and fp32.

References: transformers' `UMT5EncoderModel` holding the dequantized weights (codes times scale,
computed here from the raw file); our fp32 graph of the unquantized weights; the LightX2V file's own
codes (passthrough).  Layout facts: compiled-path-facts.md "Quantized graphs" (B [K, N], per-channel
DequantizeLinear on axis 1); LightX2V `wan_t5` quantizes attention q/k/v/o and FFN gate.0/fc1/fc2.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from wanrt.export.build import ComponentPlan, export_component, quantized_text_encoder_plan
from wanrt.export.checkpoint.companion_keys import official_t5_key_to_hf
from wanrt.export.models.t5 import T5Config, t5_state_shapes
from wanrt.export.onnx.lint import lint_onnx
from wanrt.export.tiny import lightx2v_quantized_encoder
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions

transformers = pytest.importorskip("transformers")

CFG = T5Config.tiny(vocab_size=300)
LINEARS = [f"blocks.{n}.{m}.weight" for n in range(CFG.num_layers)
           for m in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate.0", "ffn.fc1", "ffn.fc2")]  # fmt: skip
# Stated bounds: the Q/DQ graph equals transformers with the dequantized weights up to fp32 rounding;
# against the unquantized fp32 graph, weight-only 8-bit error on this random 2-layer encoder.
MAX_REL_VS_TRANSFORMERS = 1e-4
MIN_COSINE_VS_FP32 = {"int8": 0.998, "fp8": 0.985}  # measured 0.9995 and 0.9941 (2026-12-03)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The official bf16 T5 .pth (unit-scale activations, norms near 1) and LightX2V's int8 / fp8 files of it."""
    root = tmp_path_factory.mktemp("t5q")
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, shape in t5_state_shapes(CFG).items():
        std = 0.1 if "norm" in key else 1.0 if "embedding" in key else 1.0 / math.sqrt(shape[-1])
        state[key] = (torch.randn(shape, generator=g) * std + (1.0 if "norm" in key else 0.0)).to(torch.bfloat16)
    paths = {"bf16": root / "models_t5_umt5-xxl-enc-bf16.pth"}
    torch.save(state, paths["bf16"])
    for fmt in ("int8", "fp8"):
        paths[fmt] = root / f"models_t5_umt5-xxl-enc-{fmt}.pth"
        torch.save(lightx2v_quantized_encoder(state, "t5", fmt), paths[fmt])
    return root, paths


def export(path, out, scheme: str | None):
    plan = ComponentPlan("text_encoder", "text_encoder", "fp32", [path], path, {"task": "t2v"})
    if scheme is not None:
        plan = quantized_text_encoder_plan(plan, scheme)
    exported = export_component(plan, out)  # lints, as the build does
    return exported, plan.quantization


@pytest.fixture(scope="module")
def graphs(files):
    root, paths = files
    out = {"fp32": export(paths["bf16"], root / "fp32", None)}
    for fmt in ("int8", "fp8"):
        out[fmt] = export(paths[fmt], root / f"q_{fmt}", fmt)
    return out


def batch() -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(7)
    mask = (torch.arange(24)[None] < torch.tensor([24, 11])[:, None]).long()
    return (torch.randint(3, CFG.vocab_size, (2, 24), generator=g) * mask).numpy(), mask.numpy()


def run_graph(path) -> np.ndarray:
    """The graph in ONNX Runtime with the runtime's own session options (all optimizations on)."""
    ids, mask = batch()
    sess = ort.InferenceSession(str(path), OnnxRuntimeBackend(OrtOptions(device="cpu")).session_options(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def transformers_output(raw: dict[str, torch.Tensor]) -> np.ndarray:
    """UMT5EncoderModel with `codes * scale` (fp32) for every quantized linear and the stored rest."""
    real = {k: t.float() * raw[k + "_scale"].float() if k + "_scale" in raw else t.float()
            for k, t in raw.items() if not k.endswith("_scale")}  # fmt: skip
    hf = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=CFG.vocab_size, d_model=CFG.dim, d_kv=CFG.head_dim, num_heads=CFG.num_heads, d_ff=CFG.dim_ffn,
        num_layers=CFG.num_layers, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()  # fmt: skip
    hf_state = {official_t5_key_to_hf(k): t for k, t in real.items()}
    hf_state["encoder.embed_tokens.weight"] = hf_state["shared.weight"]
    hf.load_state_dict(hf_state, strict=True)
    ids, mask = batch()
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def real_tokens(x: np.ndarray) -> np.ndarray:
    _, mask = batch()
    return x[mask.astype(bool)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_graph_layout_and_lint(graphs, fmt):
    exported, report = graphs[fmt]
    assert lint_onnx(exported.graph, exported.signature) == []
    assert report.to_dict() == {"scheme": fmt, "layers": len(LINEARS), "sources": {"passthrough": len(LINEARS)}}
    model = onnx.load(exported.graph, load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    code_type = onnx.TensorProto.INT8 if fmt == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert sorted(n.input[0] for n in dqs) == sorted(LINEARS)
    for n in dqs:
        w, s = inits[n.input[0]], inits[n.input[1]]
        shape = t5_state_shapes(CFG)[n.input[0]]
        assert (w.data_type, list(w.dims), list(s.dims)) == (code_type, [shape[1], shape[0]], [shape[0]])
        assert [a.i for a in n.attribute if a.name == "axis"] == [1]
    # embeddings, norms and the relative position tables keep their precision
    assert inits["token_embedding.weight"].data_type == onnx.TensorProto.BFLOAT16
    assert inits["blocks.0.norm1.weight"].data_type == onnx.TensorProto.FLOAT
    assert inits["blocks.0.pos_embedding.embedding.weight"].data_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_codes_pass_through_bit_for_bit(files, graphs, fmt):
    _, paths = files
    raw = torch.load(paths[fmt], weights_only=True)
    model = onnx.load(graphs[fmt][0].graph)
    inits = {i.name: i for i in model.graph.initializer}
    for key in LINEARS:
        codes = raw[key].t().contiguous().view(torch.uint8).numpy().tobytes()
        assert inits[key].raw_data == codes, key
        assert np.array_equal(numpy_helper.to_array(inits[key + "_scale"]), raw[key + "_scale"].float().reshape(-1).numpy()), key


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_equals_transformers_with_the_dequantized_weights(files, graphs, fmt):
    _, paths = files
    got = real_tokens(run_graph(graphs[fmt][0].graph))
    want = real_tokens(transformers_output(torch.load(paths[fmt], weights_only=True)))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{fmt}: max rel error vs transformers UMT5 (dequantized weights) {rel:.2e}")
    assert rel <= MAX_REL_VS_TRANSFORMERS


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_close_to_the_fp32_graph(graphs, fmt):
    ref = real_tokens(run_graph(graphs["fp32"][0].graph)).reshape(-1)
    got = real_tokens(run_graph(graphs[fmt][0].graph)).reshape(-1)
    cosine = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"{fmt} vs fp32 graph: cosine {cosine:.6f}, relative error {rel:.2e}")
    assert cosine >= MIN_COSINE_VS_FP32[fmt]


def test_graph_is_smaller(graphs):
    size = {k: sum(p.stat().st_size for p in v[0].files) for k, v in graphs.items()}
    linear_bytes = sum(math.prod(t5_state_shapes(CFG)[k]) for k in LINEARS)
    print(f"tiny text encoder graph bytes: {size}")
    for fmt in ("int8", "fp8"):  # each linear: 1 byte per weight instead of 4, plus 4-byte scales per output channel
        assert size["fp32"] - size[fmt] >= 3 * linear_bytes - 4 * sum(t5_state_shapes(CFG)[k][0] for k in LINEARS) - 4096
