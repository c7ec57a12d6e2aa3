"""Wan2.2-Animate recognition: every layout make-tiny-model writes reads as `task: animate` with the same
tensors, config.json is cross-checked, the relighting LoRA is offered, and a ComfyUI-prefixed file resolves.

The released checkpoint's facts used here: 1441 tensors (14 Blur kernels among them) and the
`WanAnimateModel` / `WanAnimateTransformer3DModel` config classes (see test_wan_animate.py for the
module against diffusers).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.helpers import assert_one_line_error, run_cli
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.tiny import make_tiny_model

LAYOUTS = ("official", "lightx2v-bf16", "lightx2v-fp8", "comfyui-fp8", "diffusers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("animate")
    return {layout: make_tiny_model(root / layout, "wan2.2", "animate", layout, seed=5) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_animate_with_its_architecture(models, layout):
    r = run_cli("inspect", models[layout], "--json")
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert (d["family"], d["task"]) == ("wan2.2", "animate")
    assert d["experts"][0]["unknown_keys"] == []
    a = d["dit"]["animate"]
    assert a["face_adapter"] == {"blocks": 1, "after_dit_blocks": [0]}
    assert a["motion_encoder"]["res_blocks"] == 3 and a["motion_encoder"]["face_size"] == 32
    assert a["face_encoder"]["tokens_per_frame"] == 5
    assert d["dit"]["image_branch"] and d["dit"]["in_dim"] == 36
    assert (d["sampling"]["steps"], d["sampling"]["shift"], d["sampling"]["enable_cfg"]) == (20, 5.0, False)
    assert "animate: pose patch embedding (16 ch)" in run_cli("inspect", models[layout]).stdout


def test_diffusers_and_official_layouts_hold_the_same_tensors(models):
    official = resolve_model(models["official"]).experts[0].view
    diffusers = resolve_model(models["diffusers"]).experts[0].view
    assert sorted(official) == sorted(diffusers)
    for key in ("face_adapter.fuser_blocks.0.linear1_kv.weight", "motion_encoder.enc.net_app.convs.2.conv2.2.bias",
                "motion_encoder.dec.direction.weight", "blocks.4.cross_attn.k_img.weight"):
        assert torch.equal(official.load(key), diffusers.load(key)), key
    assert official.keymap.ignored and all(k.endswith(".kernel") for k in official.keymap.ignored)


def test_relighting_lora_is_offered_by_name(models):
    d = run_cli("inspect", models["official"], "--json").json()
    assert d["named_loras"] == {"relighting": str(models["official"] / "relighting_lora" / "adapter_model.safetensors")}
    assert any("--lora relighting" in n for n in d["notes"])


def test_comfyui_prefixed_file_resolves(models, tmp_path):
    [src] = models["lightx2v-bf16"].glob("*.safetensors")
    tensors = load_file(str(src))
    save_file({"model.diffusion_model." + k: v for k, v in tensors.items()}, str(tmp_path / "wan2.2_animate_comfy.safetensors"))
    m = resolve_model(tmp_path / "wan2.2_animate_comfy.safetensors")
    assert m.task == "animate" and m.experts[0].layout == "comfyui" and m.dit.animate is not None


@pytest.mark.parametrize("layout,field,value", [
    ("official", "motion_encoder_dim", 512),
    ("diffusers", "face_encoder_num_heads", 8),
    ("diffusers", "motion_encoder_size", 512),
])  # fmt: skip
def test_config_json_contradicting_the_weights_is_one_error(models, tmp_path, layout, field, value):
    import shutil

    copy = shutil.copytree(models[layout], tmp_path / layout)
    path = copy / ("transformer" if layout == "diffusers" else "") / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    assert_one_line_error(["inspect", copy], "config.json", field, str(value))


def test_animate_config_class_on_plain_weights_is_one_error(tmp_path):
    model = make_tiny_model(tmp_path / "i2v", "wan2.1", "i2v", "official", seed=1)
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "WanAnimateModel"}))
    assert_one_line_error(["inspect", model], "WanAnimateModel", "no Animate modules")


def test_lightx2v_quantizes_the_face_adapter_linears(models):
    """LightX2V's `wan_animate_dit` mode: block linears and the adapter keys linear1_kv/linear1_q/linear2 as codes."""
    view = resolve_model(models["lightx2v-fp8"]).experts[0].view
    quantized = {k for k, r in view.items() if r.quantized}
    assert {"face_adapter.fuser_blocks.0.linear1_kv.weight", "face_adapter.fuser_blocks.0.linear1_q.weight",
            "face_adapter.fuser_blocks.0.linear2.weight", "blocks.0.ffn.0.weight"} <= quantized
    assert not any(k.startswith(("motion_encoder.", "face_encoder.", "pose_patch_embedding.")) for k in quantized)
    official = resolve_model(models["official"]).experts[0].view
    key = "face_adapter.fuser_blocks.0.linear1_kv.weight"
    assert (view.load(key) - official.load(key)).abs().max() <= official.load(key).abs().max() / 8  # fp8 e4m3 step


def test_lora_relighting_names_the_shipped_file(models):
    from wanrt.export.build import read_loras

    resolved = resolve_model(models["official"])
    [spec] = read_loras(resolved, ("relighting:0.5",))
    assert spec.path == models["official"] / "relighting_lora" / "adapter_model.safetensors" and spec.strength == 0.5
    [other] = read_loras(resolve_model(models["official"]), (str(spec.path),))  # a path stays a path
    assert other.path == spec.path and other.strength == 1.0
