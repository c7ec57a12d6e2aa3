"""`--lora PATH[:STRENGTH][@EXPERT]`, LightX2V `lora_configs`, and bundle LoRA records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wanrt.engines.model import LoraRecord
from wanrt.export.lora import LoraError, LoraSpec, lora_records, loras_from_config, parse_lora_arg


@pytest.mark.parametrize(
    "arg,path,strength,expert",
    [
        ("style.safetensors", "style.safetensors", 1.0, None),
        ("style.safetensors:0.5", "style.safetensors", 0.5, None),
        ("style.safetensors:-1.25@high_noise", "style.safetensors", -1.25, "high_noise"),
        ("/loras/distill.safetensors@low_noise", "/loras/distill.safetensors", 1.0, "low_noise"),
        ("/loras/v1.0/distill.safetensors", "/loras/v1.0/distill.safetensors", 1.0, None),
        ("/loras/a@b/x@2x.safetensors:0.3", "/loras/a@b/x@2x.safetensors", 0.3, None),
        ("C:\\loras\\x.safetensors:2", "C:\\loras\\x.safetensors", 2.0, None),
        ("dist.safetensors:1e-1@low_noise_model", "dist.safetensors", 0.1, "low_noise"),
        ("/loras/lora@style:0.5", "/loras/lora@style", 0.5, None),  # '@style' is no expert name: part of the path
    ],
)
def test_parse_lora_arg(arg, path, strength, expert):
    assert parse_lora_arg(arg) == LoraSpec(Path(path), strength, expert)


@pytest.mark.parametrize(
    "arg,message",
    [
        ("style.safetensors:strong", "strength 'strong' is not a number"),
        ("style.safetensors:nan", "not a finite number"),
        ("style.safetensors@medium_noise", "unknown expert 'medium_noise'"),
        ("style.safetensors@high_noise:0.5",
         r"the expert comes last; expected PATH\[:STRENGTH\]\[@high_noise\|@low_noise\], e\.g\. style\.safetensors:0\.5@high_noise"),
        ("/loras/x.safetensors@low_noise_model:-1", r"expert comes last.*e\.g\. /loras/x\.safetensors:-1@low_noise_model"),
        ("", "empty value"),
    ],
)
def test_parse_lora_arg_errors(arg, message):
    with pytest.raises(LoraError, match=message):
        parse_lora_arg(arg)


def test_a_path_holding_a_colon_that_exists_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("odd:name").write_bytes(b"x")
    assert parse_lora_arg("odd:name") == LoraSpec(Path("odd:name"))
    Path("lora@high_noise:v2").write_bytes(b"x")  # looks like expert-before-strength, but it is a file
    assert parse_lora_arg("lora@high_noise:v2") == LoraSpec(Path("lora@high_noise:v2"))


def test_loras_from_config(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "high.safetensors").write_bytes(b"h")
    cfg = {
        "lora_configs": [
            {"path": "loras/high.safetensors", "strength": 0.8, "name": "high_noise_model"},
            {"path": "/abs/low.safetensors", "alpha": 16, "name": "low_noise_model"},
            {"path": "/abs/both.safetensors"},
        ],
        "lora_path": ["/abs/legacy.safetensors"],
        "strength_model": 0.25,
    }
    specs = loras_from_config(cfg, tmp_path / "config.json")
    assert specs == [
        LoraSpec(tmp_path / "loras" / "high.safetensors", 0.8, "high_noise"),  # relative to the config's folder
        LoraSpec(Path("/abs/low.safetensors"), 1.0, "low_noise", alpha=16.0),
        LoraSpec(Path("/abs/both.safetensors")),
        LoraSpec(Path("/abs/legacy.safetensors"), 0.25),
    ]
    with pytest.raises(LoraError, match=r"lora_configs\[0\].name: unknown expert 'mid'"):
        loras_from_config({"lora_configs": [{"path": "x", "name": "mid"}]}, tmp_path / "c.json")
    with pytest.raises(LoraError, match=r"lora_configs\[0\].*strength 'x' is not a finite number"):
        loras_from_config({"lora_configs": [{"path": "x", "strength": "x"}]}, tmp_path / "c.json")


def test_lora_records_hash_the_files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"first lora")
    b.write_bytes(b"second lora")
    records = lora_records([LoraSpec(a, 0.5, "high_noise"), LoraSpec(b, 1.0, alpha=8.0)])
    assert records == [
        LoraRecord(str(a), hashlib.sha256(b"first lora").hexdigest(), 0.5, ["high_noise"], None),
        LoraRecord(str(b), hashlib.sha256(b"second lora").hexdigest(), 1.0, [], 8.0),
    ]
    with pytest.raises(LoraError, match="no such file"):
        lora_records([LoraSpec(tmp_path / "missing.safetensors")])
