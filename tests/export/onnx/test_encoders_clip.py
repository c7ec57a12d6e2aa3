"""ONNX image_encoder: signature, lint, official visual.* weights streamed, ONNX Runtime equals torch; fp16/bf16."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import image_encoder_signature
from wanrt.export.onnx.encoders import export_image_encoder_onnx
from wanrt.export.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from wanrt.export.onnx.lint import lint_onnx

CFG = CLIPVisionConfig.tiny()
SIGNATURE = image_encoder_signature(CFG.width, CFG.image_size, CFG.tokens)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def model() -> CLIPVisionEncoder:
    torch.manual_seed(2)
    m = CLIPVisionEncoder(CFG).eval()
    with torch.no_grad():  # the zero-initialized embeddings get values, so every input matters
        for p in (m.cls_embedding, m.pos_embedding, m.head):
            p.normal_(0.0, 0.5)
    return m


@pytest.fixture(scope="module")
def fp32_export(model, tmp_path_factory):
    """Export from a full official-layout CLIP .pth (visual.* next to textual.* and log_scale)."""
    root = tmp_path_factory.mktemp("cliponnx")
    state = {"visual." + k: v for k, v in model.state_dict().items()}
    state |= {"textual.token_embedding.weight": torch.zeros(10, 8), "log_scale": torch.tensor(4.6)}
    torch.save(state, root / "clip.pth")
    return export_image_encoder_onnx(root / "clip.pth", root / "image_encoder", "fp32", progress=False).files


def test_lint_io_and_only_the_used_weights(fp32_export):
    assert fp32_export == [fp32_export[0].parent / "model.onnx", fp32_export[0].parent / "model.onnx.data"]
    assert lint_onnx(fp32_export[0], SIGNATURE) == []
    graph = onnx.load(fp32_export[0], load_external_data=False).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["clip_fea"]
    names = {t.name for t in graph.initializer}
    assert "transformer.0.attn.to_qkv.weight" in names and "patch_embedding.weight" in names
    last = f"transformer.{CFG.num_layers - 1}."
    assert not [n for n in names if n.startswith((last, "post_norm", "head"))]  # Wan never runs them


def test_onnxruntime_equals_torch_at_two_batch_sizes(fp32_export, model):
    session = ort.InferenceSession(str(fp32_export[0]), providers=["CPUExecutionProvider"])
    for b in (1, 2):
        pixels = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        with torch.no_grad():
            want = model(pixels).numpy()
        assert got.shape == (b, 257, CFG.width) and got.dtype == np.float32
        assert rel_err(got, want) < 1e-4


def half_module(model: CLIPVisionEncoder, dtype: torch.dtype) -> CLIPVisionEncoder:
    half = CLIPVisionEncoder(CFG).to(dtype).eval()
    half.load_state_dict(model.state_dict())
    return half


def test_fp16_export_runs_in_onnxruntime(model, tmp_path):
    files = export_image_encoder_onnx(model, tmp_path / "fp16", "fp16", progress=False).files
    assert model.patch_embedding.weight.dtype == torch.float32  # the caller's module is not cast
    assert lint_onnx(files[0], SIGNATURE) == []
    dtypes = {t.name: t.data_type for t in onnx.load(files[0], load_external_data=False).graph.initializer}
    assert dtypes["transformer.0.mlp.0.weight"] == onnx.TensorProto.FLOAT16
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(files[0])).run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = half_module(model, torch.float16)(pixels).numpy()
    assert got.dtype == np.float32 and rel_err(got, want) < 5e-3


def test_bf16_export_follows_torch_bf16(model, tmp_path):
    files = export_image_encoder_onnx(model, tmp_path / "bf16", "bf16", progress=False).files
    assert lint_onnx(files[0], SIGNATURE) == []  # no bf16 Conv: the patch embedding is a MatMul
    dtypes = {t.name: t.data_type for t in onnx.load(files[0], load_external_data=False).graph.initializer}
    assert dtypes["patch_embedding.weight"] == onnx.TensorProto.BFLOAT16
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    # ONNX Runtime's CPU provider has no bf16 kernels; the ONNX reference evaluator runs the graph
    got = ReferenceEvaluator(str(files[0])).run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        want = half_module(model, torch.bfloat16)(pixels).numpy()
    assert got.dtype == np.float32 and rel_err(got, want) < 2e-2


def test_refusals(model, tmp_path):
    with pytest.raises(WanrtError, match="image encoder precision 'int8': expected one of fp32, bf16, fp16"):
        export_image_encoder_onnx(model, tmp_path / "x", "int8")
    missing = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    with pytest.raises(WanrtError, match=rf"{missing} not found; the wan2.1 flf2v task needs it"):
        export_image_encoder_onnx(missing, tmp_path / "x", task="wan2.1 flf2v")
    assert not (tmp_path / "x").exists()
