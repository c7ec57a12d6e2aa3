"""A LoRA holding NaN or infinite values is refused by `convert` and `build-engine`: one line, exit 2, nothing written."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli import cli
from wanrt.export.tiny import make_tiny_model

from .conftest import lightx2v_lora

TARGETS = ["blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight"]
BAD_VALUES = [math.nan, math.inf, -math.inf]


def poisoned_lora(base_sd, path, which: int, position: int, value: float):
    """A valid LightX2V LoRA with one value of its `which`-th tensor replaced by `value`."""
    sd, _ = lightx2v_lora(base_sd, TARGETS, 4, seed=5)
    key = sorted(sd)[which % len(sd)]
    flat = sd[key].reshape(-1)
    flat[position % flat.numel()] = value
    save_file(sd, str(path))
    return key


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.startswith("out"))


@pytest.mark.parametrize("which, position", [(0, 0), (1, 7), (2, 1000), (3, 3)])
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_convert_refuses_a_non_finite_lora(base_file, base_sd, tmp_path, which, position, value):
    lora = tmp_path / "bad_lora.safetensors"
    key = poisoned_lora(base_sd, lora, which, position, value)
    r = CliRunner().invoke(cli, ["convert", str(base_file), "-o", str(tmp_path / "out.safetensors"), "--lora", str(lora)])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if "error:" in line]  # progress bars share stderr
    assert len(errors) == 1 and str(lora) in errors[0] and repr(key) in errors[0] and "NaN or infinite" in errors[0], r.stderr
    assert leftovers(tmp_path) == []


def test_a_finite_lora_that_overflows_the_merge_is_refused(base_file, base_sd, tmp_path):
    sd, _ = lightx2v_lora(base_sd, TARGETS, 4, seed=5, std=1e19)  # finite, but up @ down overflows float32
    lora = tmp_path / "huge_lora.safetensors"
    save_file(sd, str(lora))
    r = CliRunner().invoke(cli, ["convert", str(base_file), "-o", str(tmp_path / "out.safetensors"), "--lora", str(lora)])
    assert r.exit_code == 2 and "merging the LoRAs gives NaN or infinite weights" in r.stderr, r.output
    assert leftovers(tmp_path) == []


def test_build_engine_refuses_a_non_finite_lora(tmp_path):
    model = make_tiny_model(tmp_path / "model", "wan2.1", "t2v")
    base_sd = {k: v.float() for shard in model.glob("diffusion_pytorch_model*.safetensors") for k, v in load_file(str(shard)).items()}
    lora = tmp_path / "bad_lora.safetensors"
    key = poisoned_lora(base_sd, lora, 1, 2, math.nan)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(cli, ["build-engine", str(model), "-o", str(out), "--lora", str(lora), "--precision", "fp32"])
    assert r.exit_code == 2, r.output
    assert str(lora) in r.stderr and repr(key) in r.stderr and "NaN or infinite" in r.stderr, r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
