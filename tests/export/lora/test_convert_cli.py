"""`cli.py convert`: LightX2V / ComfyUI output layouts, metadata, MoE experts, and bad inputs (exit 2, one line)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli import cli
from wanrt.export.checkpoint.view import CheckpointView, open_source
from wanrt.export.tiny import make_tiny_model

from .conftest import lightx2v_lora

REPO = Path(__file__).resolve().parents[3]
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight$")
TARGETS = ["blocks.0.self_attn.q.weight", "blocks.1.cross_attn.v.weight", "blocks.0.ffn.2.weight"]
RANK = 4
STRENGTH = 0.6


def run(*args: str):
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.fixture(scope="module")
def lora(tmp_path_factory, base_sd):
    sd, deltas = lightx2v_lora(base_sd, TARGETS, RANK, seed=3)
    path = tmp_path_factory.mktemp("cli_lora") / "style_lora.safetensors"
    save_file(sd, str(path))
    return path, deltas


@pytest.fixture(scope="module")
def merged_ref(base_sd, lora):
    """The merged weights in float64 (plain torch)."""
    _, deltas = lora
    return {k: v.double() + (STRENGTH * deltas[k] if k in deltas else 0) for k, v in base_sd.items()}


def test_bf16_output_with_lora_and_metadata(base_file, lora, merged_ref, tmp_path, assert_close):
    path, _ = lora
    out = tmp_path / "out.safetensors"
    r = run(base_file, "-o", out, "--lora", f"{path}:{STRENGTH}", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tensors"] == len(merged_ref) and summary["loras"][0]["patched_tensors"] == len(TARGETS)
    got = load_file(str(out))
    assert set(got) == set(merged_ref) and all(t.dtype == torch.bfloat16 for t in got.values())
    assert_close(got, merged_ref, atol=1e-7, rtol=2**-8)  # one bf16 rounding
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["wanrt_convert"])
    assert meta["source_files"] == [{"path": str(base_file), "size": base_file.stat().st_size}]
    assert meta["loras"] == [
        {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "strength": STRENGTH, "experts": [], "alpha": None}
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_lightx2v_layout(fmt, base_file, lora, merged_ref, tmp_path, assert_close):
    path, _ = lora
    out = tmp_path / f"{fmt}.safetensors"
    r = run(base_file, "-o", out, "--lora", f"{path}:{STRENGTH}", "--quantize", fmt, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["quantization_error"]["tensors"] == 20  # 2 blocks x 10 linears
    got = load_file(str(out))
    linears = {k for k in merged_ref if BLOCK_LINEAR.match(k)}
    assert set(got) == set(merged_ref) | {k[: -len(".weight")] + ".weight_scale" for k in linears}
    qmax = 448.0 if fmt == "fp8" else 127.0
    for k, want in merged_ref.items():
        if k not in linears:
            assert got[k].dtype == torch.bfloat16
            continue
        q, s = got[k], got[k[: -len(".weight")] + ".weight_scale"]
        assert q.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
        assert s.dtype == torch.float32 and s.shape == (want.shape[0], 1)
        assert_close(s, want.abs().amax(dim=1, keepdim=True) / qmax, atol=0, rtol=1e-5)
        deq = q.double() * s.double()
        err_bound = torch.maximum(want.abs() * 2**-4, s.double() * 2**-10) if fmt == "fp8" else (s.double() / 2).expand_as(want)
        assert bool(((deq - want).abs() <= err_bound * (1 + 1e-5) + 1e-9).all()), k
    view = CheckpointView([open_source(out)])
    assert (view.layout, view.precision, view.scale) == ("lightx2v", f"{'fp8_e4m3' if fmt == 'fp8' else 'int8'}", "per_channel")
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert '"lightx2v"' in r.stdout


def test_comfyui_scaled_fp8_layout(base_file, lora, merged_ref, tmp_path):
    path, _ = lora
    out = tmp_path / "comfy.safetensors"
    r = run(base_file, "-o", out, "--lora", f"{path}:{STRENGTH}", "--quantize", "fp8", "--comfyui")
    assert r.exit_code == 0, r.output
    got = load_file(str(out))
    assert got["scaled_fp8"].dtype == torch.float8_e4m3fn and got["scaled_fp8"].shape == (2,)
    assert not any(k.endswith(".weight_scale") for k in got)
    for k in TARGETS:
        s = got[k[: -len(".weight")] + ".scale_weight"]
        assert s.shape == () and s.dtype == torch.float32
        assert float(s) == pytest.approx(float(merged_ref[k].abs().max()) / 448.0, rel=1e-5)
    view = CheckpointView([open_source(out)])
    assert (view.layout, view.precision, view.scale) == ("comfyui", "fp8_e4m3", "per_tensor")


def test_fp8_source_is_copied_losslessly_and_lora_requantizes(base_file, lora, tmp_path, assert_close):
    fp8 = tmp_path / "fp8.safetensors"
    assert run(base_file, "-o", fp8, "--quantize", "fp8").exit_code == 0
    again = tmp_path / "again.safetensors"
    r = run(fp8, "-o", again, "--json")
    assert r.exit_code == 0, r.output
    a, b = load_file(str(fp8)), load_file(str(again))
    assert set(a) == set(b)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a if a[k].dtype == torch.float8_e4m3fn)
    assert all(torch.equal(a[k], b[k]) for k in a if a[k].dtype != torch.float8_e4m3fn)
    path, deltas = lora
    r = run(fp8, "-o", tmp_path / "merged.safetensors", "--lora", str(path), "--json")
    assert r.exit_code == 0, r.output
    req = json.loads(r.stdout)["requantization_error"]
    assert req["tensors"] == len(TARGETS) and 0 < req["overall_rel_rms"] < 0.05
    # to bf16: dequantize, merge, one bf16 rounding (no fp8 requantization in between)
    out = tmp_path / "merged_bf16.safetensors"
    assert run(fp8, "-o", out, "--lora", str(path), "--quantize", "bf16").exit_code == 0
    got = load_file(str(out))
    assert all(t.dtype == torch.bfloat16 for t in got.values()) and not any(k.endswith("_scale") for k in got)
    want = {k: a[k].double() * a[k[: -len(".weight")] + ".weight_scale"].double() + deltas[k] for k in TARGETS}
    assert_close({k: got[k] for k in TARGETS}, want, atol=1e-7, rtol=2**-8)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moe") / "wan22", "wan2.2", "t2v")


def test_moe_expert_selection_and_lora_targeting(moe, tmp_path, make_lora):
    r = run(moe, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--expert" in r.stderr
    low = CheckpointView([open_source(f) for f in sorted((moe / "low_noise_model").glob("*.safetensors"))])
    low_sd = low.state_dict()
    lora_sd, _ = make_lora(low_sd, TARGETS, RANK, seed=9)
    lora_path = tmp_path / "moe_lora.safetensors"
    save_file(lora_sd, str(lora_path))

    out = tmp_path / "low_untouched.safetensors"
    r = run(moe, "-o", out, "--expert", "low_noise", "--lora", f"{lora_path}@high_noise", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loras"] == []
    got = load_file(str(out))
    assert all(torch.equal(got[k], low_sd[k].to(torch.bfloat16)) for k in low_sd)

    cfg = tmp_path / "lightx2v.json"
    cfg.write_text(json.dumps({"lora_configs": [{"path": str(lora_path), "strength": 0.5, "name": "low_noise_model"}]}))
    out = tmp_path / "low_merged.safetensors"
    r = run(moe, "-o", out, "--expert", "low_noise", "--config", cfg, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loras"][0]["expert"] == "low_noise"
    got = load_file(str(out))
    changed = {k for k in low_sd if not torch.equal(got[k], low_sd[k].to(torch.bfloat16))}
    assert changed == set(TARGETS)


def _bad_lora(kind: str, tmp_path, base_sd) -> str:
    path = tmp_path / f"{kind}.safetensors"
    if kind == "corrupt":
        path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
        return str(path)
    w = base_sd["blocks.0.self_attn.q.weight"]
    up, down = torch.zeros(w.shape[0], RANK), torch.zeros(RANK, w.shape[1])
    if kind == "rank":
        down = torch.zeros(RANK + 1, w.shape[1])
    elif kind == "shape":
        down = torch.zeros(RANK, w.shape[1] + 8)
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": up, "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down}
    if kind == "dora":
        sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(w.shape[0], 1)
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize(
    "kind,extra,message",
    [
        ("corrupt", [], r"corrupt\.safetensors: corrupt safetensors header"),
        ("rank", [], r"rank mismatch.*\[256, 4\].*\[5, 256\]"),
        ("shape", [], r"shape mismatch for 'blocks\.0\.self_attn\.q\.weight'.*\[4, 264\].*\[256, 256\]"),
        ("dora", [], r"DoRA"),
        ("strength", [], r"strength 'strong' is not a number"),
        ("expert_at", [], r"unknown expert 'medium_noise'"),
        ("expert_first", [], r"the expert comes last; expected PATH\[:STRENGTH\]\[@high_noise\|@low_noise\]"),
        ("expert_opt", ["--expert", "medium_noise"], r"--expert: unknown expert 'medium_noise'"),
        ("quantize", ["--quantize", "fp4"], r"--quantize 'fp4'"),
        ("missing", [], r"nothing_here\.safetensors"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(kind, extra, message, base_file, base_sd, tmp_path):
    lora_dir = tmp_path / "in"
    lora_dir.mkdir()
    arg = {
        "strength": str(base_file.parent / "any.safetensors") + ":strong",
        "expert_at": str(base_file.parent / "any.safetensors") + "@medium_noise",
        "expert_first": str(base_file.parent / "any.safetensors") + "@high_noise:0.5",
        "missing": str(tmp_path / "nothing_here.safetensors"),
    }.get(kind) or _bad_lora(kind if kind in ("corrupt", "rank", "shape", "dora") else "ok", lora_dir, base_sd)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run(base_file, "-o", out_dir / "out.safetensors", "--lora", arg, *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []


def _inspect(path) -> dict:
    r = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_converted_moe_expert_is_inspected_as_that_expert(moe, tmp_path):
    """Wan2.2 A14B t2v experts have Wan2.1 14B t2v shapes: the convert metadata, not the shapes, says which model it is."""
    out = tmp_path / "converted" / "dit.safetensors"  # a name that says nothing about the expert
    out.parent.mkdir()
    assert run(moe, "-o", out, "--expert", "low_noise").exit_code == 0
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["wanrt_convert"])
    assert (meta["expert"], meta["family"], meta["task"]) == ("low_noise", "wan2.2", "t2v")
    got = _inspect(out)
    assert (got["family"], got["task"]) == ("wan2.2", "t2v")
    assert [(e["name"], e["moe_expert"]) for e in got["experts"]] == [("dit", "low_noise")]
    assert got["sampling"]["boundary"] is None  # one expert: nothing to switch to
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "expert dit (low_noise expert of a Wan2.2 A14B pair)" in r.stdout

    again = tmp_path / "again.safetensors"  # converting the converted file keeps what it is
    assert run(out, "-o", again, "--quantize", "fp8").exit_code == 0
    got = _inspect(again)
    assert (got["family"], got["experts"][0]["moe_expert"], got["experts"][0]["precision"]) == ("wan2.2", "low_noise", "fp8_e4m3")

    bare = tmp_path / "bare" / "dit.safetensors"  # the same tensors without the metadata: the shapes decide
    bare.parent.mkdir()
    save_file(load_file(str(out)), str(bare))
    got = _inspect(bare)
    assert (got["family"], got["task"], got["experts"][0]["moe_expert"]) == ("wan2.1", "t2v", None)
    named = tmp_path / "bare" / "wan2.2_t2v_low_noise_bf16.safetensors"  # ... or the file name, as before
    bare.rename(named)
    assert (_inspect(named)["family"], _inspect(named)["experts"][0]["moe_expert"]) == ("wan2.2", "low_noise")


def test_a_converted_single_dit_records_its_family_and_task(base_file, tmp_path):
    out = tmp_path / "t2v.safetensors"
    assert run(base_file, "-o", out).exit_code == 0
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["wanrt_convert"])
    assert (meta["expert"], meta["family"], meta["task"]) == ("dit", "wan2.1", "t2v")  # in_dim 16, no img_emb: Wan2.1 t2v
    got = _inspect(out)
    assert (got["family"], got["task"], got["experts"][0]["moe_expert"]) == ("wan2.1", "t2v", None)


@pytest.fixture
def lora_with_extra_key(base_sd, tmp_path):
    """A LoRA on one base linear plus one key for a module the base lacks (an I2V `k_img` on a T2V base)."""
    sd, _ = lightx2v_lora(base_sd, TARGETS[:1], RANK, seed=5)
    sd["diffusion_model.blocks.0.cross_attn.k_img.diff_b"] = torch.zeros(base_sd["blocks.0.self_attn.q.bias"].shape)
    path = tmp_path / "extra_key_lora.safetensors"
    save_file(sd, str(path))
    return path


def test_lora_strict_makes_an_unmatched_key_an_error(base_file, lora_with_extra_key, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run(base_file, "-o", out_dir / "out.safetensors", "--lora", lora_with_extra_key, "--lora-strict")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(lora_with_extra_key) in lines[0] and "1 of 3 keys match nothing in the base model" in lines[0], lines[0]
    assert "diffusion_model.blocks.0.cross_attn.k_img.diff_b" in lines[0] and "--lora-strict" in lines[0]
    assert "skipped" not in lines[0]
    assert list(out_dir.iterdir()) == []


def test_unmatched_lora_keys_warn_on_stderr_with_count_and_examples(base_file, lora_with_extra_key, tmp_path):
    """Without --lora-strict the real CLI (a subprocess: no test logging handlers) warns once and converts."""
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, str(REPO / "cli.py"), "convert", str(base_file), "-o", str(out), "--lora", str(lora_with_extra_key), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, r.stderr
    assert str(lora_with_extra_key) in warnings[0] and "1 of 3 keys match nothing in the base model and are skipped" in warnings[0]
    assert "diffusion_model.blocks.0.cross_attn.k_img.diff_b" in warnings[0]
    assert json.loads(r.stdout)["loras"][0]["skipped_keys"] == 1 and out.is_file()
