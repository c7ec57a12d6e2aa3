"""Where wanrt reads a LoRA as LightX2V does, and where the merge report says LightX2V would differ.

LightX2V's LoRA merge (`lightx2v/utils/lora_loader.py`, `LoRALoader`, called by
`lightx2v/models/networks/lora_adapter.py`; lightx2v-formats.md §2, compiled-path-facts.md
"Peers read for real"), hand-worked for the keys below:
- scale: `if pair_info["alpha"]: alpha / rank`, else the global alpha / rank, else 1, so a
  stored alpha of 0 means scale 1 (strength 1: W + up @ down);
- target: the key without its LoRA suffix, with ONE of `diffusion_model.`, `model.`, `unet.` removed,
  plus `.weight` (pairs, `.diff`), `.bias` (`.diff_b`) or `.modulation` (`.diff_m`); nothing else is
  renamed. So `model.diffusion_model.blocks.0.self_attn.q.lora_up.weight` aims at
  `diffusion_model.blocks.0.self_attn.q.weight`, `transformer.blocks.0.attn1.to_q.lora_B.weight` at
  `transformer.blocks.0.attn1.to_q.weight`, `lora_unet_blocks_0_self_attn_q.lora_up.weight` at
  `lora_unet_blocks_0_self_attn_q.weight` and `diffusion_model.blocks.0.modulation.diff` at
  `blocks.0.modulation.weight`: none is a base tensor, so LightX2V applies none of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanrt.export.checkpoint.view import CheckpointView, open_source
from wanrt.export.lora import LoraSpec, apply_loras

REPO = Path(__file__).resolve().parents[3]
RANK = 4


@pytest.fixture(scope="module")
def view(base_file):
    return CheckpointView([open_source(base_file)])


def pair(base_sd, module: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    o, i = base_sd[module + ".weight"].shape
    return torch.randn(o, RANK, generator=g) * 0.1, torch.randn(RANK, i, generator=g) * 0.1


def test_alpha_zero_reads_as_no_alpha_with_a_note(base_sd, view, write_file, assert_close):
    q, k = "blocks.0.self_attn.q", "blocks.1.cross_attn.k"
    (uq, dq), (uk, dk) = pair(base_sd, q, 1), pair(base_sd, k, 2)
    path = write_file({
        f"diffusion_model.{q}.lora_up.weight": uq, f"diffusion_model.{q}.lora_down.weight": dq,
        f"diffusion_model.{q}.alpha": torch.tensor(0.0),
        f"diffusion_model.{k}.lora_up.weight": uk, f"diffusion_model.{k}.lora_down.weight": dk,
        f"diffusion_model.{k}.alpha": torch.tensor(2.0),
    })  # fmt: skip
    merged = apply_loras(view, [LoraSpec(path, 0.5)], "dit")
    assert_close(merged.load(q + ".weight"), base_sd[q + ".weight"].double() + 0.5 * 1.0 * (uq.double() @ dq.double()))
    assert_close(merged.load(k + ".weight"), base_sd[k + ".weight"].double() + 0.5 * (2.0 / RANK) * (uk.double() @ dk.double()))
    (note,) = merged.report.loras[0].notes
    assert str(path) in note and "1 layer(s) store alpha 0" in note and f"diffusion_model.{q}.alpha" in note and "LightX2V" in note
    # a config alpha stands in for a missing one, so also for an alpha of 0
    merged = apply_loras(view, [LoraSpec(path, 1.0, alpha=16.0)], "dit")
    assert_close(merged.load(q + ".weight"), base_sd[q + ".weight"].double() + 16.0 / RANK * (uq.double() @ dq.double()))


def lora_in_form(base_sd, form: str) -> dict[str, torch.Tensor]:
    """Two low-rank layers (or one modulation delta) in one key form."""
    sd = {}
    for n, (official, diffusers) in enumerate([("blocks.0.self_attn.q", "blocks.0.attn1.to_q"), ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj")]):
        up, down = pair(base_sd, official, 10 + n)
        if form == "double_prefix":
            sd |= {f"model.diffusion_model.{official}.lora_up.weight": up, f"model.diffusion_model.{official}.lora_down.weight": down}
        elif form == "peft_transformer":
            sd |= {f"transformer.{diffusers}.lora_B.weight": up, f"transformer.{diffusers}.lora_A.weight": down}
        elif form == "kohya":
            k = "lora_unet_" + official.replace(".", "_")
            sd |= {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(float(RANK))}
        elif form in ("lightx2v", "single_prefixes"):
            prefix = "diffusion_model." if form == "lightx2v" or n == 0 else "model."
            sd |= {f"{prefix}{official}.lora_up.weight": up, f"{prefix}{official}.lora_down.weight": down}
    g = torch.Generator().manual_seed(3)
    if form == "modulation_diff":
        sd["diffusion_model.blocks.0.modulation.diff"] = torch.randn(base_sd["blocks.0.modulation"].shape, generator=g)
    if form == "lightx2v":  # its own delta forms
        sd["diffusion_model.blocks.0.diff_m"] = torch.randn(base_sd["blocks.0.modulation"].shape, generator=g)
        sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(base_sd["blocks.0.self_attn.q.bias"].shape, generator=g)
        sd["diffusion_model.head.head.diff"] = torch.randn(base_sd["head.head.weight"].shape, generator=g)
    return sd


@pytest.mark.parametrize("form,keys,says", [
    ("double_prefix", 4, ["`model.diffusion_model.` prefix", "strips only one"]),
    ("peft_transformer", 4, ["`transformer.` prefix", "diffusers module names"]),
    ("kohya", 4, ["kohya `lora_unet_` names"]),
    ("modulation_diff", 1, ["`.diff` deltas of a parameter", "diff_m"]),
])  # fmt: skip
def test_key_forms_lightx2v_would_not_apply_are_named(form, keys, says, base_sd, view, write_file):
    path = write_file(lora_in_form(base_sd, form), f"{form}.safetensors")
    merged = apply_loras(view, [LoraSpec(path)], "dit")
    match = merged.report.loras[0]
    assert match.skipped == [] and match.patched  # wanrt applies every key
    (note,) = match.notes
    assert f"{keys} key(s) use" in note and "LightX2V's LoRA merge (its default, lora_dynamic_apply off) would not apply" in note and str(path) in note
    for phrase in says:
        assert phrase in note, note
    assert merged.report.to_dict()["loras"][0]["notes"] == [note]


@pytest.mark.parametrize("form", ["lightx2v", "single_prefixes"])
def test_forms_lightx2v_applies_get_no_note(form, base_sd, view, write_file):
    path = write_file(lora_in_form(base_sd, form), f"{form}.safetensors")
    match = apply_loras(view, [LoraSpec(path)], "dit").report.loras[0]
    assert match.notes == [] and match.skipped == []


@pytest.fixture(scope="module")
def noted_lora(tmp_path_factory, base_sd):
    """A double-prefix LoRA with an alpha of 0 on one layer: two notes."""
    sd = lora_in_form(base_sd, "double_prefix")
    sd["model.diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(0.0)
    path = tmp_path_factory.mktemp("noted") / "noted_lora.safetensors"
    save_file(sd, str(path))
    return path


def cli_run(*args) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (no test logging handlers in between)."""
    cmd = [sys.executable, str(REPO / "cli.py"), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def notes_on_stderr(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("note: LoRA ")]


def check_two_notes(notes: list[str], path: Path) -> None:
    assert len(notes) == 2, notes
    assert "store alpha 0" in notes[0] and "`model.diffusion_model.` prefix" in notes[1]
    assert all(str(path) in n for n in notes)


def test_convert_prints_the_notes_and_reports_them_in_json(base_file, noted_lora, tmp_path):
    r = cli_run("convert", base_file, "-o", tmp_path / "text.safetensors", "--lora", noted_lora)
    check_two_notes(notes_on_stderr(r), noted_lora)
    r = cli_run("convert", base_file, "-o", tmp_path / "json.safetensors", "--lora", noted_lora, "--json")
    check_two_notes(notes_on_stderr(r), noted_lora)
    check_two_notes([f"note: {n}" for n in json.loads(r.stdout)["loras"][0]["notes"]], noted_lora)


def test_build_engine_prints_the_notes_and_reports_them_in_json(tmp_path, base_sd):
    from wanrt.export.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", "wan2.1", "t2v", seed=2)
    sd = lora_in_form({k: v for k, v in base_sd.items()}, "double_prefix")  # the tiny model has the same block shapes
    sd["model.diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(0.0)
    lora = tmp_path / "noted_lora.safetensors"
    save_file(sd, str(lora))
    out = tmp_path / "bundle"
    r = cli_run("build-engine", model, "-o", out, "--components", "dit", "--lora", lora)
    check_two_notes(notes_on_stderr(r), lora)
    r = cli_run("build-engine", model, "-o", out, "--components", "dit", "--lora", lora, "--json")  # reused: still noted
    check_two_notes(notes_on_stderr(r), lora)
    assert json.loads(r.stdout)["components"]["dit"]["status"] == "reused"
    check_two_notes([f"note: {n}" for n in json.loads(r.stdout)["notes"] if n.startswith("LoRA ")], lora)
