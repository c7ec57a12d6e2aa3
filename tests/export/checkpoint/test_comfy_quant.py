"""ComfyUI `comfy_quant` layers (`export/checkpoint/comfy_quant.py`).

Facts (Comfy-Org/ComfyUI, recorded in the module's docstring): `<layer>.comfy_quant` is a uint8
tensor of the UTF-8 JSON `{"format": ...}`, written as `torch.tensor(list(json.dumps(conf).encode()),
dtype=torch.uint8)`; `convert_old_quants` turns a `scaled_fp8` file into that form (`scale_weight` ->
`weight_scale`, one `{"format": "float8_e4m3fn"}` per layer), or reads the same table from the
metadata key `_quantization_metadata`.  nvfp4: uint8 weight [out, in/2], fp8 `weight_scale`
[out, in/16], fp32 `weight_scale_2`; mxfp8: fp8 weight, e8m0 (uint8) `weight_scale` [out, in/32].
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.helpers import run_cli
from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.resolve import resolve_model

REPO = Path(__file__).resolve().parents[3]
LAYER = "blocks.1.ffn.0"


def comfy_quant(conf: dict) -> torch.Tensor:
    """A `comfy_quant` tensor the way ComfyUI writes it."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def new_style(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny `scaled_fp8` ComfyUI file as `convert_old_quants` rewrites it (scale renamed, comfy_quant per layer)."""
    old = load_file(next(tiny_model("wan2.1", "t2v", "comfyui-fp8").glob("*.safetensors")))
    new = {}
    for key, t in old.items():
        if key.endswith("scaled_fp8"):
            continue
        if key.endswith(".scale_weight"):
            layer = key[: -len(".scale_weight")]
            new[layer + ".weight_scale"] = t
            new[layer + ".comfy_quant"] = comfy_quant({"format": "float8_e4m3fn"})
        else:
            new[key] = t
    return new


def test_float8_comfy_quant_file_reads_like_the_scaled_fp8_file(tiny_model, tmp_path):
    save_file(new_style(tiny_model), tmp_path / "new.safetensors")
    new = resolve_model(tmp_path / "new.safetensors").experts[0].view
    old = resolve_model(next(tiny_model("wan2.1", "t2v", "comfyui-fp8").glob("*.safetensors"))).experts[0].view
    assert (new.precision, new.scale, new.unknown_keys) == ("fp8_e4m3", "per_tensor", [])
    assert sorted(new) == sorted(old)
    for key in old:
        assert torch.equal(new.load(key), old.load(key)), key
    code = f"import sys, cli; from wanrt.export.checkpoint.resolve import resolve_model; resolve_model({str(tmp_path / 'new.safetensors')!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the JSON is read without torch


def nvfp4(state: dict[str, torch.Tensor], layer: str) -> None:
    out, inp = state[layer + ".weight"].shape
    state[layer + ".weight"] = torch.zeros(out, inp // 2, dtype=torch.uint8)
    state[layer + ".weight_scale"] = torch.zeros(out, inp // 16, dtype=torch.float8_e4m3fn)
    state[layer + ".weight_scale_2"] = torch.ones(())
    state[layer + ".comfy_quant"] = comfy_quant({"format": "nvfp4"})


def mxfp8(state: dict[str, torch.Tensor], layer: str) -> None:
    out, inp = state[layer + ".weight"].shape
    state[layer + ".weight_scale"] = torch.full((out, inp // 32), 127, dtype=torch.uint8)
    state[layer + ".comfy_quant"] = comfy_quant({"format": "mxfp8"})


@pytest.mark.parametrize("fmt, rewrite", [("nvfp4", nvfp4), ("mxfp8", mxfp8)])
def test_formats_not_read_are_named_with_the_layer(tiny_model, tmp_path, fmt, rewrite):
    state = new_style(tiny_model)
    rewrite(state, LAYER)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(state, path)
    r = run_cli("inspect", path)
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line == (f"error: {path}: layer {LAYER!r} is quantized in ComfyUI's {fmt!r} format (its comfy_quant);"
                    " wanrt reads float8_e4m3fn and int8_tensorwise layers: use a bf16, LightX2V fp8/int8 or float8_e4m3fn file")


def test_the_metadata_table_form_is_read_too(tiny_model, tmp_path):
    state = {k: v for k, v in new_style(tiny_model).items() if not k.endswith(".comfy_quant")}
    layers = {k[: -len(".weight_scale")]: {"format": "float8_e4m3fn"} for k in state if k.endswith(".weight_scale")}
    layers["model.diffusion_model." + LAYER] = {"format": "mxfp8"}
    state = {"model.diffusion_model." + k: v for k, v in state.items()}
    save_file(state, tmp_path / "meta.safetensors", metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with pytest.raises(CheckpointError, match=rf"layer 'model\.diffusion_model\.{LAYER}' is quantized in ComfyUI's 'mxfp8' format"):
        resolve_model(tmp_path / "meta.safetensors")


def test_rotated_int8_and_bad_json_are_refused(tiny_model, tmp_path):
    state = new_style(tiny_model)
    state[LAYER + ".comfy_quant"] = comfy_quant({"format": "int8_tensorwise", "convrot": True})
    save_file(state, tmp_path / "rot.safetensors")
    with pytest.raises(CheckpointError, match=r"'int8_tensorwise' format with convrot \(Hadamard-rotated weights\)"):
        resolve_model(tmp_path / "rot.safetensors")
    state[LAYER + ".comfy_quant"] = torch.tensor(list(b"{format"), dtype=torch.uint8)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: '{LAYER}\.comfy_quant' is not a JSON description"):
        resolve_model(tmp_path / "bad.safetensors")
