"""LightX2V's quantized T5 / CLIP files: the tiny writer against LightX2V's converter, reading them, and choosing them.

The oracle for the file layout is `tests/data/lightx2v_encoder_converter.json`: key order, dtype, shape and
sha256 of every tensor LightX2V's own `tools/convert/converter.py` wrote (`-t wan_t5` / `-t wan_clip
--quantized --linear_type int8|fp8`, run on CPU) from the float T5 / CLIP files of
`make-tiny-model --family wan2.1 --task i2v --seed 0`.  Selection facts: LightX2V `wan_runner.py`
(`t5_quantized`, `t5_quant_scheme`, `t5_quantized_ckpt`, default `models_t5_umt5-xxl-enc-{fmt}.pth`) and
`utils.py::find_torch_model_path` (model_path/<int8|fp8|original|...>/name, then model_path/name).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.export.helpers import assert_one_line_error
from wanrt.engines.errors import WanrtError
from wanrt.export.checkpoint.companions import open_companion
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.tiny import make_tiny_model

ORACLE = Path(__file__).parents[2] / "data" / "lightx2v_encoder_converter.json"
T5_INT8 = "models_t5_umt5-xxl-enc-int8.pth"
CLIP_INT8 = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-int8.pth"


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory):
    """fmt -> a tiny Wan2.1 i2v folder holding only LightX2V's quantized T5 / CLIP (no float encoder files)."""
    root = tmp_path_factory.mktemp("qenc")
    return {fmt: make_tiny_model(root / fmt, "wan2.1", "i2v", seed=0, encoders=fmt) for fmt in ("int8", "fp8")}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("kind,fmt", [("t5", "int8"), ("t5", "fp8"), ("clip", "int8"), ("clip", "fp8")])
def test_tiny_files_equal_lightx2v_converter_output(quantized_models, kind, fmt):
    """Every tensor, in order, bit for bit: what LightX2V's converter wrote from the same float file."""
    want = json.loads(ORACLE.read_text())["files"][f"{kind}-{fmt}"]["tensors"]
    name = {"t5": f"models_t5_umt5-xxl-enc-{fmt}.pth", "clip": f"models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fmt}.pth"}
    state = torch.load(quantized_models[fmt] / name[kind], weights_only=True)
    got = [[k, str(t.dtype).removeprefix("torch."), list(t.shape), _digest(t)] for k, t in state.items()]
    assert [g[:3] for g in got] == [w[:3] for w in want]  # names, dtypes, [out, 1] scale shapes, order
    assert [g[0] for g, w in zip(got, want) if g[3] != w[3]] == []  # the bytes of codes, scales and the rest


def test_codes_read_back_as_codes_times_scale(quantized_models):
    """The file's codes times its per-channel `<key>_scale`, computed here from the raw state dict."""
    path = quantized_models["int8"] / T5_INT8
    raw = torch.load(path, weights_only=True)
    src = open_companion(path)
    assert not any(k.endswith("_scale") for k in src.keys()) and "blocks.0.attn.q.weight" in src.keys()
    for key in ("blocks.0.attn.q.weight", "blocks.1.ffn.gate.0.weight", "blocks.1.ffn.fc2.weight"):
        assert raw[key].dtype == torch.int8
        assert torch.equal(src.read(key), raw[key].float() * raw[key + "_scale"].float()), key
    for key in ("token_embedding.weight", "blocks.0.pos_embedding.embedding.weight", "blocks.0.norm1.weight"):
        assert torch.equal(src.read(key), raw[key]), key  # not quantized by wan_t5: kept as stored
    clip_path = quantized_models["fp8"] / "models_clip_open-clip-xlm-roberta-large-vit-huge-14-fp8.pth"
    raw, src = torch.load(clip_path, weights_only=True), open_companion(clip_path)
    for key in ("visual.transformer.0.attn.to_qkv.weight", "visual.transformer.1.mlp.2.weight"):
        assert raw[key].dtype == torch.float8_e4m3fn and raw[key + "_scale"].shape == (raw[key].shape[0], 1)
        assert torch.equal(src.read(key), raw[key].float() * raw[key + "_scale"].float()), key
    assert torch.equal(src.read("visual.transformer.0.attn.to_qkv.bias"), raw["visual.transformer.0.attn.to_qkv.bias"])


def test_a_folder_of_quantized_encoders_resolves_without_a_config(quantized_models):
    m = resolve_model(quantized_models["int8"])
    assert (m.text_encoder.name, m.image_encoder.name) == (T5_INT8, CLIP_INT8)


@pytest.fixture
def lightx2v_folder(quantized_models, tmp_path):
    """The int8 model with its T5 / CLIP moved into `int8/` (a LightX2V subfolder), and a config writer."""
    root = tmp_path / "model"
    shutil.copytree(quantized_models["int8"], root)
    (root / "int8").mkdir()
    for name in (T5_INT8, CLIP_INT8):
        (root / name).rename(root / "int8" / name)

    def config(**keys) -> Path:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"model_path": str(root), **keys}))
        return path

    return root, config


def test_config_selects_lightx2v_default_names(lightx2v_folder):
    root, config = lightx2v_folder
    m = resolve_model(root, config(t5_quantized=True, t5_quant_scheme="int8-vllm", clip_quantized=True, clip_quant_scheme="int8"))
    assert (m.text_encoder, m.image_encoder) == (root / "int8" / T5_INT8, root / "int8" / CLIP_INT8)
    assert not any("quantized" in n for n in m.notes)


def test_config_names_the_files(lightx2v_folder, tmp_path):
    root, config = lightx2v_folder
    elsewhere = tmp_path / "t5-int8.pth"
    (root / "int8" / T5_INT8).rename(elsewhere)
    m = resolve_model(root, config(t5_quantized=True, t5_quant_scheme="int8-q8f", t5_quantized_ckpt=str(elsewhere)))
    assert m.text_encoder == elsewhere


def _drop(path: Path, key: str) -> None:
    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)


@pytest.mark.parametrize("keys,damage,needles", [
    ({"t5_quant_scheme": "fp8-sgl"}, None, ["t5_quantized is true", "models_t5_umt5-xxl-enc-fp8.pth"]),
    ({"t5_quant_scheme": "fp8-sgl", "t5_quantized_ckpt": "int8/" + T5_INT8}, None,
     [T5_INT8, "'blocks.0.attn.q.weight' is stored as int8", "t5_quant_scheme 'fp8-sgl'"]),
    ({"t5_quant_scheme": "int8-vllm"}, "blocks.1.ffn.fc1.weight_scale",
     [T5_INT8, "'blocks.1.ffn.fc1.weight' has no per-channel 'blocks.1.ffn.fc1.weight_scale'"]),
    ({"t5_quant_scheme": "int8-vllm", "t5_quantized_ckpt": "int8/missing.pth"}, None, ["t5_quantized_ckpt", "missing.pth"]),
    ({"t5_quant_scheme": "nvfp4"}, None, ["t5_quant_scheme is 'nvfp4'"]),
])  # fmt: skip
def test_bad_quantized_encoder_is_one_line_and_writes_nothing(lightx2v_folder, tmp_path, keys, damage, needles):
    root, config = lightx2v_folder
    if damage:
        _drop(root / "int8" / T5_INT8, damage)
    cfg = config(t5_quantized=True, **{k: str(root / v) if k.endswith("_ckpt") else v for k, v in keys.items()})
    with pytest.raises(WanrtError):
        resolve_model(root, cfg)
    out = tmp_path / "bundle"
    assert_one_line_error(["build-engine", root, "-o", out, "--config", cfg], *needles)
    assert not out.exists() and not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_quantized_keys_without_the_flag_are_not_used(lightx2v_folder):
    root, config = lightx2v_folder
    m = resolve_model(root, config(t5_quant_scheme="int8-vllm", t5_quantized_ckpt=str(root / "int8" / T5_INT8)))
    assert "t5_quant_scheme, t5_quantized_ckpt are not used: t5_quantized is not true (LightX2V reads the quantized file only then)" in m.notes
