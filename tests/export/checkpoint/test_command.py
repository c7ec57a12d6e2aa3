"""`cli.py inspect` (`export/checkpoint/command.py`): a fresh process imports only what reading headers needs.

The README promises `inspect` reads headers only; `bench/inspect_load.py` times it.  Here: no
torch, numpy, ONNX or tokenizer library is imported, and of wanrt only the bundle contract and
the header-reading checkpoint modules (not the name maps the loaders use, nor the writers).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.export.helpers import run_cli

HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "ml_dtypes", "safetensors", "diffusers", "transformers",
         "tokenizers", "huggingface_hub", "PIL", "scipy", "tqdm")
NOT_NEEDED = ("wanrt.export.checkpoint.companion_keys", "wanrt.export.checkpoint.safetensors_writer", "wanrt.export.models",
              "wanrt.export.lora", "wanrt.export.onnx", "wanrt.export.tiny", "wanrt.export.convert", "wanrt.export.build",
              "wanrt.calibration.quant", "wanrt.runtime", "wanrt.plugins_trt")  # calibration.formats is a torch-free table


def offenders(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") or m.startswith(n + "_") for n in names))


@pytest.mark.parametrize("family, task, layout", [
    ("wan2.1", "i2v", "official"), ("wan2.1", "i2v", "lightx2v-fp8"), ("wan2.1", "flf2v", "diffusers"),
    ("wan2.2", "t2v", "official"), ("wan2.1", "t2v", "comfyui-fp8"),
])
def test_inspect_imports_only_what_it_needs(tiny_model, cli_modules, family, task, layout):
    code, modules = cli_modules("inspect", tiny_model(family, task, layout), "--json")
    assert code == 0
    assert offenders(modules, HEAVY) == []
    assert offenders(modules, NOT_NEEDED) == []
    assert "wanrt.export.checkpoint.resolve" in modules  # the harness really ran inspect


def test_inspect_with_a_config_and_human_output_stays_light(tiny_model, cli_modules, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dit_quantized": True, "dit_quant_scheme": "fp8-musa", "sample_shift": 5}))
    code, modules = cli_modules("inspect", tiny_model("wan2.1", "t2v", "lightx2v-fp8"), "--config", cfg)
    assert code == 0 and offenders(modules, HEAVY + NOT_NEEDED) == []


def test_inspect_human_output(tiny_model):
    r = run_cli("inspect", tiny_model("wan2.2", "t2v", "lightx2v-fp8"))
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("wan2.2 t2v")
    assert any("expert high_noise" in ln and "fp8_e4m3" in ln and "per_channel" in ln for ln in lines)
    assert any(ln.strip().startswith("dit: dim 256") for ln in lines)


def test_inspect_checks_the_configs_loras_as_convert_does_without_torch(tiny_model, cli_modules, tmp_path):
    model = tiny_model("wan2.1", "t2v", "official")
    lora = tmp_path / "style.safetensors"
    rng = np.random.default_rng(0)
    save_file({  # LightX2V form on two block linears of the tiny DiT (dim 256)
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rng.standard_normal((256, 4), np.float32),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": rng.standard_normal((4, 256), np.float32),
        "diffusion_model.blocks.1.ffn.2.lora_up.weight": rng.standard_normal((256, 4), np.float32),
        "diffusion_model.blocks.1.ffn.2.lora_down.weight": rng.standard_normal((4, 512), np.float32),
        "not_a_lora_key": np.zeros(1, np.float32),
    }, str(lora))  # fmt: skip
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lora_configs": [{"path": str(lora), "strength": 0.5}]}))
    code, modules = cli_modules("inspect", model, "--config", cfg, "--json")
    assert code == 0 and offenders(modules, HEAVY) == []
    r = run_cli("inspect", model, "--config", cfg, "--json")
    (record,) = json.loads(r.stdout)["config_loras"]
    assert (record["patched_tensors"], record["skipped_keys"], record["strength"]) == (2, 1, 0.5)

    for entries, expected in [
        ([{"path": str(tmp_path / "missing.safetensors")}], "missing.safetensors: no such file"),
        ([{"strength": 1.0}], r"lora_configs\[0\] must be an object with a string 'path'"),
        ([{"path": str(lora), "strength": "high"}], "strength 'high' is not a finite number"),
        ([{"path": str(cfg)}], "c.json"),  # not a safetensors file
    ]:
        cfg.write_text(json.dumps({"lora_configs": entries}))
        r = run_cli("inspect", model, "--config", cfg)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1, r.output
        assert re.search(expected, errors[0]), errors[0]
