"""Every bad input of issue 2 gets one line `error: ...` naming the file and the problem, exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import run_cli


def assert_one_line_error(args, *needles: str) -> str:
    r = run_cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def official_copy(tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("wan2.1", "t2v", "official"), dst)
    return dst


def test_missing_shard(official_copy):
    shard = official_copy / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.unlink()
    assert_one_line_error(["inspect", official_copy], shard.name, "missing", "index.json")


def _rewrite_index(folder: Path, rename) -> Path:
    """Rewrite the folder's index, naming each shard `rename(name)` instead of its bare file name."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: rename(v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return index


def test_index_shard_paths_resolve_relative_to_the_index(official_copy, tiny_model):
    """`./name` and `sub/name` in a weight_map are paths relative to the index's folder."""
    want = run_cli("inspect", tiny_model("wan2.1", "t2v", "official"), "--json").json()
    (official_copy / "shards").mkdir()
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (official_copy / second).rename(official_copy / "shards" / second)
    _rewrite_index(official_copy, lambda name: f"shards/{name}" if name == second else f"./{name}")
    r = run_cli("inspect", official_copy, "--json")
    assert r.exit_code == 0, r.stderr
    got = r.json()
    assert got["experts"][0]["files"] == [
        str(official_copy / "diffusion_pytorch_model-00001-of-00002.safetensors"), str(official_copy / "shards" / second)
    ]
    assert got["dit"] == want["dit"] and got["experts"][0]["num_params"] == want["experts"][0]["num_params"]


@pytest.mark.parametrize("shard", ["./gone.safetensors", "sub/gone.safetensors", "../diffusion_pytorch_model-00001-of-00002.safetensors"])
def test_index_naming_a_missing_or_outside_shard(official_copy, shard):
    """A shard path that is missing, or escapes the index's folder (even to a real file), is the missing-shard error."""
    outside = official_copy.parent / "diffusion_pytorch_model-00001-of-00002.safetensors"
    shutil.copy(official_copy / outside.name, outside)
    index = _rewrite_index(official_copy, lambda name: shard)
    assert_one_line_error(["inspect", official_copy], index, f"names shard {shard}", "missing from")


def test_header_length_past_end(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert_one_line_error(["inspect", p], p, "header length 10000", "past the end")


def test_truncated_file(tiny_model, tmp_path):
    src = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    p = tmp_path / src.name
    p.write_bytes(src.read_bytes()[:-1000])
    assert_one_line_error(["inspect", p], p, "out of range", "truncated")


def test_offsets_out_of_range(tmp_path):
    p = raw_safetensors(tmp_path / "oob.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    assert_one_line_error(["inspect", p], p, "'a'", "out of range")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    p = raw_safetensors(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    assert_one_line_error(["inspect", p], p, "overlap")


def test_unknown_dtype(tmp_path):
    p = raw_safetensors(tmp_path / "f4.safetensors", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    assert_one_line_error(["inspect", p], p, "unknown dtype 'F4'")


def test_duplicate_keys_across_shards(official_copy):
    s1, s2 = sorted(official_copy.glob("diffusion_pytorch_model-*.safetensors"))
    first = load_file(s1)
    key = next(iter(first))
    second = load_file(s2)
    second[key] = first[key]
    save_file(second, s2)
    assert_one_line_error(["inspect", official_copy], "duplicate tensor", key, s1.name, s2.name)


def test_shape_contradicting_config_json(official_copy):
    cfg = json.loads((official_copy / "config.json").read_text())
    cfg["dim"] = 512
    (official_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", official_copy], official_copy / "config.json", "dim is 512", "256")


def test_dtype_contradicting_config_json(official_copy):
    cfg = json.loads((official_copy / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (official_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", official_copy], official_copy / "config.json", "bfloat16", "fp32")


def test_quant_scheme_contradicting_file(tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dit_quantized": True, "dit_quant_scheme": "fp8-sgl"}))
    root = tiny_model("wan2.1", "t2v", "lightx2v-int8")
    assert_one_line_error(["inspect", root, "--config", cfg], cfg, "fp8-sgl", "int8")


def test_unsupported_quant_scheme(tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dit_quantized": True, "dit_quant_scheme": "nvfp4"}))
    line = assert_one_line_error(["inspect", tiny_model("wan2.1", "t2v", "lightx2v-fp8"), "--config", cfg], cfg, "'nvfp4'")
    for scheme in ("fp8-vllm", "int8-vllm", "fp8-sgl", "int8-sgl", "fp8-q8f", "int8-q8f", "fp8-triton", "int8-triton",
                   "fp8-torchao", "int8-torchao"):
        assert scheme in line


@pytest.mark.parametrize("layout, dtype, name", [
    ("lightx2v-fp8", torch.float8_e5m2, "fp8_e5m2"),  # scaled e5m2: not a LightX2V / ComfyUI storage format
    ("lightx2v-bf16", torch.float64, "fp64"),
])
def test_unsupported_block_linear_storage_dtype(tiny_model, tmp_path, layout, dtype, name):
    """Block linears are fp32/fp16/bf16/fp8_e4m3/int8 (issue 2's precision list); anything else is refused by key."""
    src = next(tiny_model("wan2.1", "t2v", layout).glob("*.safetensors"))
    state = load_file(src)
    key = "blocks.1.ffn.2.weight"
    state[key] = state[key].to(torch.float32).to(dtype)
    p = tmp_path / src.name
    save_file(state, p)
    assert_one_line_error(["inspect", p], p, repr(key), name, "unsupported storage dtype", "fp8_e4m3")
    assert_one_line_error(["convert", p, "-o", tmp_path / "out.safetensors", "--quantize", "bf16"], p, repr(key), name)
    assert sorted(x.name for x in tmp_path.iterdir()) == [src.name]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(["inspect", tmp_path / "empty"], tmp_path / "empty", "empty folder")


def test_several_candidate_files(tiny_model, tmp_path):
    for layout in ("lightx2v-bf16", "lightx2v-fp8"):
        f = next(tiny_model("wan2.1", "i2v", layout).glob("*.safetensors"))
        shutil.copy(f, tmp_path / f.name)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert_one_line_error(["inspect", tmp_path], "several candidate", *names, "dit_original_ckpt")


def test_safetensors_and_pth_dit_candidates(tiny_model, tmp_path):
    """A DiT .safetensors beside a DiT .pt (LightX2V distill_model.pt) is a choice for the user, not a silent pick."""
    src = tiny_model("wan2.1", "t2v", "lightx2v-bf16")
    st = next(src.glob("*.safetensors"))
    shutil.copy(st, tmp_path / st.name)
    torch.save({"state_dict": load_file(st)}, tmp_path / "distill_model.pt")
    for companion in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copy(src / companion, tmp_path / companion)
    line = assert_one_line_error(["inspect", tmp_path], "several candidate", "distill_model.pt", st.name, "dit_original_ckpt")
    assert ".pth" not in line  # the T5 / VAE companions are not DiT candidates
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dit_original_ckpt": str(tmp_path / "distill_model.pt")}))
    r = run_cli("inspect", tmp_path, "--config", cfg, "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["experts"][0]["files"] == [str(tmp_path / "distill_model.pt")]
    assert r.json()["text_encoder"] == str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")


def _lora(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(256, 4, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 256, generator=g),
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(256, generator=g),
    }, path)
    return path


def test_lora_passed_as_the_model(tmp_path):
    p = _lora(tmp_path / "wan2.1_t2v_lora_rank4.safetensors")
    assert_one_line_error(["inspect", p], p, "is a LoRA", "--lora")
    assert_one_line_error(["inspect", tmp_path], p, "is a LoRA")


def test_config_key_pointing_at_a_missing_file(tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{\n  // the distilled model\n  "dit_original_ckpt": "nowhere/wan2.1_t2v_14b_lightx2v_4step.safetensors"\n}\n')
    assert_one_line_error(["inspect", tiny_model("wan2.1", "t2v", "official"), "--config", cfg],
                          cfg, "dit_original_ckpt", "nowhere/wan2.1_t2v_14b_lightx2v_4step.safetensors", "does not exist")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_with_code_executing_pickle(official_copy, tmp_path):
    marker = tmp_path / "PWNED"
    t5 = official_copy / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, t5)
    assert_one_line_error(["inspect", official_copy], t5, "refusing to load", "code")
    assert_one_line_error(["inspect", t5], t5, "refusing to load")
    assert not marker.exists()


def test_truncated_or_foreign_pth_says_why_in_whole_sentences(official_copy, tmp_path):
    """torch's long loader errors become one clear reason, never a sentence cut off mid-word."""
    t5 = official_copy / "models_t5_umt5-xxl-enc-bf16.pth"
    data = t5.read_bytes()
    t5.write_bytes(data[: len(data) // 2])
    line = assert_one_line_error(["inspect", official_copy], t5, "not a readable .pth file", "truncated or corrupt zip archive: ")
    with pytest.raises(RuntimeError) as torch_error:
        torch.load(t5, map_location="cpu", weights_only=True, mmap=True)
    said, torch_line = line.split("truncated or corrupt zip archive: ", 1)[1], str(torch_error.value).splitlines()[0]
    assert torch_line.startswith(said) and torch_line[len(said):][:2] in ("", ".", ". ")  # torch's first sentence, whole
    t5.write_bytes(b"not a checkpoint at all\n" * 4)
    assert_one_line_error(["inspect", t5], t5, "not a zip-format torch checkpoint")


def test_first_sentence_cuts_at_sentence_or_word_boundaries():
    from wanrt.export.checkpoint.pth import first_sentence

    assert first_sentence("Failed reading zip archive: no central directory. This is an internal error. Retry.") == (
        "Failed reading zip archive: no central directory"
    )
    long = " ".join(f"word{i}" for i in range(100))  # one 590-character sentence
    cut = first_sentence(long, limit=50)
    assert cut.endswith(" ...") and len(cut) <= 54 and long.startswith(cut[: -len(" ...")] + " ")


def test_make_tiny_model_bad_arguments(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert_one_line_error(["make-tiny-model", tmp_path / "taken", "--family", "wan2.1", "--task", "t2v"],
                          tmp_path / "taken", "already exists")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.1", "--task", "ti2v"], "wan2.1 has no 'ti2v'")
    assert_one_line_error(["make-tiny-model", tmp_path / "m", "--family", "wan2.2", "--task", "t2v", "--dims", "7B"], "--dims '7B'")
    assert not (tmp_path / "m").exists()


def test_make_tiny_model_writes_atomically(tmp_path):
    r = run_cli("make-tiny-model", tmp_path / "out", "--family", "wan2.2", "--task", "ti2v", "--layout", "lightx2v-int8", "--seed", "3")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it
