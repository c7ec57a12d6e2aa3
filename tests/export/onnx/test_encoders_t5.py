"""ONNX text_encoder: signature, lint, streamed official weights, ONNX Runtime equals torch at two shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import text_encoder_signature
from wanrt.export.onnx.encoders import export_text_encoder_onnx, holds_bf16_values, token_table_dtype
from wanrt.export.models.t5 import T5Config, T5Encoder
from wanrt.export.onnx.lint import lint_onnx

CFG = T5Config.tiny(vocab_size=300)


def real_token_rel_err(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(got - want)[keep].max() / np.abs(want[keep]).max())


def batch(b: int, length: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(3, CFG.vocab_size, (b, length), generator=g) * mask, mask


@pytest.fixture(scope="module")
def model() -> T5Encoder:
    """A random encoder whose token table holds bf16 values, as the official file stores it."""
    torch.manual_seed(1)
    model = T5Encoder(CFG).eval()
    with torch.no_grad():
        model.token_embedding.weight.copy_(model.token_embedding.weight.to(torch.bfloat16))
    return model


@pytest.fixture(scope="module")
def fp32_export(model, tmp_path_factory):
    """Export from an official-layout .pth (bf16 token table, fp32 rest): traced on meta, weights streamed."""
    root = tmp_path_factory.mktemp("t5onnx")
    state = model.state_dict()
    state["token_embedding.weight"] = state["token_embedding.weight"].to(torch.bfloat16)
    torch.save(state, root / "models_t5_umt5-xxl-enc-bf16.pth")
    out = root / "text_encoder"
    return out, export_text_encoder_onnx(root / "models_t5_umt5-xxl-enc-bf16.pth", out, "fp32", progress=False)


def test_files_names_and_lint(fp32_export, model):
    out, exported = fp32_export
    files = exported.files
    assert files == [out / "model.onnx", out / "model.onnx.data"] and exported.signature == text_encoder_signature(CFG.dim)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temp leftovers
    assert lint_onnx(files[0], text_encoder_signature(CFG.dim)) == []
    graph = onnx.load(files[0], load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["context"]
    assert set(model.state_dict()) <= {t.name for t in graph.initializer}  # official names survive


def test_fp32_graph_keeps_the_bf16_token_table_and_casts_gathered_rows(fp32_export):
    """umt5-xxl's table is 3.9 GiB in fp32 (over TensorRT's 2 GiB per weight): it stays bf16 as stored."""
    files = fp32_export[1].files
    graph = onnx.load(files[0], load_external_data=False).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    assert dtypes["token_embedding.weight"] == onnx.TensorProto.BFLOAT16
    assert dtypes["blocks.0.attn.q.weight"] == onnx.TensorProto.FLOAT
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == "token_embedding.weight")
    (cast,) = [n for n in graph.node if gather.output[0] in n.input]
    assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT


def test_token_table_dtype_rule(model):
    """bf16 when the source is bf16 (lossless) or when fp32 would pass 2 GiB; otherwise the export dtype."""
    real = T5Config()
    assert token_table_dtype(real, torch.float32, source_is_bf16=True) == torch.bfloat16
    assert token_table_dtype(real, torch.float32, source_is_bf16=False) == torch.bfloat16  # 3.9 GiB in fp32
    assert token_table_dtype(CFG, torch.float32, source_is_bf16=False) == torch.float32  # never rounded when it fits
    assert token_table_dtype(CFG, torch.bfloat16, source_is_bf16=False) == torch.bfloat16
    table = model.token_embedding.weight
    assert holds_bf16_values(table, CFG) and not holds_bf16_values(table + 1e-3, CFG)


def test_onnxruntime_equals_torch_at_two_shapes(fp32_export, model):
    files = fp32_export[1].files
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    for ids, mask in (batch(1, 9, [9], seed=0), batch(2, 150, [150, 23], seed=1)):
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = model(ids, mask).numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        assert real_token_rel_err(got, want, mask.numpy()) < 1e-4


def test_bf16_export_keeps_fp32_io_and_follows_torch_bf16(model, tmp_path):
    files = export_text_encoder_onnx(model, tmp_path / "bf16", "bf16", progress=False).files
    assert model.token_embedding.weight.dtype == torch.float32  # the caller's module is not cast
    assert lint_onnx(files[0], text_encoder_signature(CFG.dim)) == []
    graph = onnx.load(files[0], load_external_data=False).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    assert dtypes["blocks.0.attn.q.weight"] == onnx.TensorProto.BFLOAT16
    assert dtypes["token_embedding.weight"] == onnx.TensorProto.BFLOAT16
    # ONNX Runtime's CPU provider has no bf16 kernels; the ONNX reference evaluator runs the graph
    ids, mask = batch(2, 12, [12, 5], seed=2)
    got = ReferenceEvaluator(str(files[0])).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    bf16 = T5Encoder(CFG).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = bf16(ids, mask).numpy()
    assert got.dtype == np.float32
    assert real_token_rel_err(got, want, mask.numpy()) < 2e-2  # two bf16 implementations, rounding apart


def test_refusals(model, tmp_path):
    with pytest.raises(WanrtError, match="text encoder precision 'fp16': expected one of fp32, bf16"):
        export_text_encoder_onnx(model, tmp_path / "x", "fp16")
    with pytest.raises(WanrtError, match="models_t5_umt5-xxl-enc-bf16.pth not found; the wan2.1 t2v task needs it"):
        export_text_encoder_onnx(None, tmp_path / "x", task="wan2.1 t2v")
    assert not (tmp_path / "x").exists()
