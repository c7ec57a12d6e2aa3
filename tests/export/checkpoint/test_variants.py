"""Wan DiT variants (`export/checkpoint/variants.py`): VACE is read as VACE in every layout, the variants wanrt
does not implement are refused by name, and only keys no variant has stay "listed, not used".

References: diffusers' `WanVACETransformer3DModel` (its config and its own single-file converter
`convert_wan_transformer_to_diffusers`), the official `VaceWanModel` config.json fields (Wan2.1
wan/modules/vace_model.py: `vace_layers`, `vace_in_dim`), the official module names of Wan2.2-S2V
(wan/modules/s2v/model_s2v.py) and Wan2.2-Animate (diffusers `WanAnimateTransformer3DModel`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from tests.export.helpers import assert_one_line_error, run_cli
from tests.export.models.dit_cases import CASES, diffusers_model, official_state
from wanrt.export.checkpoint.keys import official_to_diffusers
from wanrt.export.checkpoint.storage import is_block_linear

LAYOUTS = ["official", "lightx2v-bf16", "lightx2v-fp8", "lightx2v-int8", "comfyui-fp8", "diffusers"]
VACE_IN_DIM = 96  # official VACE: 16 inactive + 16 reactive latent channels + 64 packed mask channels


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vace_is_read_as_vace_in_every_layout(tiny_model, layout):
    got = run_cli("inspect", tiny_model("wan2.1", "vace", layout), "--json").json()
    official = run_cli("inspect", tiny_model("wan2.1", "vace", "official"), "--json").json()
    assert (got["family"], got["task"]) == ("wan2.1", "vace")
    assert got["dit"]["vace_in_dim"] == VACE_IN_DIM and got["dit"]["in_dim"] == 16 and not got["dit"]["image_branch"]
    assert got["dit"]["vace_layers"][0] == 0 and got["dit"]["vace_blocks"] == len(got["dit"]["vace_layers"]) >= 2
    assert got["dit"] == official["dit"]  # the layout changes nothing about the model
    assert got["experts"][0]["unknown_keys"] == []
    text = run_cli("inspect", tiny_model("wan2.1", "vace", layout)).stdout
    assert f"VACE blocks at layers {got['dit']['vace_layers']}" in text


def uneven_vace(tmp_path):
    """A diffusers VACE model with hints after layers 0 and 3 of 5 (not evenly spaced), and its official state."""
    case = replace(CASES["vace"], cfg=replace(CASES["vace"].cfg, num_layers=5, vace_layers=(0, 3)))
    model = diffusers_model(case, seed=3)
    return model, official_state(model)


def test_config_json_places_the_vace_blocks(tmp_path):
    model, state = uneven_vace(tmp_path)
    official = tmp_path / "official"
    official.mkdir()
    save_file(state, official / "diffusion_pytorch_model.safetensors")
    (official / "config.json").write_text(json.dumps({
        "_class_name": "VaceWanModel", "dim": 256, "ffn_dim": 512, "in_dim": 16, "out_dim": 16, "num_heads": 2,
        "num_layers": 5, "model_type": "vace", "vace_layers": [0, 3], "vace_in_dim": VACE_IN_DIM,
    }))
    model.save_pretrained(tmp_path / "diffusers" / "transformer")
    for folder in (official, tmp_path / "diffusers"):
        got = run_cli("inspect", folder, "--json").json()
        assert got["task"] == "vace" and got["dit"]["vace_layers"] == [0, 3] and got["dit"]["num_layers"] == 5, folder


def test_convert_keeps_the_vace_placement_in_its_single_file(tmp_path):
    """A converted VACE file has no config.json beside it; its metadata keeps vace_layers."""
    _, state = uneven_vace(tmp_path)
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"_class_name": "VaceWanModel", "vace_layers": [0, 3]}))
    out = tmp_path / "out" / "vace_fp8.safetensors"
    out.parent.mkdir()
    r = run_cli("convert", tmp_path / "src", "-o", out, "--quantize", "fp8")
    assert r.exit_code == 0, r.stderr
    got = run_cli("inspect", out, "--json").json()
    assert got["task"] == "vace" and got["dit"]["vace_layers"] == [0, 3]


def test_uneven_vace_blocks_without_config_json_ask_for_it(tmp_path):
    _, state = uneven_vace(tmp_path)
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, tmp_path / "vace.safetensors")
    assert_one_line_error(["inspect", tmp_path / "vace.safetensors"], "2 VACE blocks among 5 layers", "config.json")


def test_config_json_vace_layers_must_fit_the_weights(tmp_path):
    _, state = uneven_vace(tmp_path)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "VaceWanModel", "dim": 256, "num_layers": 5, "in_dim": 16, "vace_layers": [0, 2, 4]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(["inspect", tmp_path], "vace_layers [0, 2, 4]", "2 VACE blocks")
    (tmp_path / "config.json").write_text(json.dumps({**config, "vace_layers": [1, 3]}))
    assert_one_line_error(["inspect", tmp_path], "vace_layers [1, 3]", "starting at 0")


@pytest.mark.parametrize("layout,field", [("official", "vace_in_dim"), ("diffusers", "vace_in_channels")])
def test_config_json_control_channels_must_fit_the_weights(tiny_model, tmp_path, layout, field):
    folder = shutil.copytree(tiny_model("wan2.1", "vace", layout), tmp_path / "model")
    config = folder / ("transformer/config.json" if layout == "diffusers" else "config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), field: 48}))
    assert_one_line_error(["inspect", folder], field, "48", "vace_patch_embedding.weight")


def test_vace_names_match_diffusers_own_converter(tmp_path):
    """Our official -> diffusers names for every VACE tensor equal diffusers' single-file converter's."""
    _, state = uneven_vace(tmp_path)
    theirs = convert_wan_transformer_to_diffusers(dict(state))
    ours = {official_to_diffusers(k): k for k in state}
    assert set(ours) == set(theirs)
    for name, key in ours.items():
        assert torch.equal(theirs[name], state[key]), (key, name)
    assert ours["vace_blocks.0.proj_in.weight"] == "vace_blocks.0.before_proj.weight"
    assert ours["vace_blocks.1.proj_out.bias"] == "vace_blocks.1.after_proj.bias"


def test_vace_block_linears_are_block_linears():
    """Quantization, LoRA and convert treat a VACE block's linears (before/after_proj too) like a block's."""
    for key in ("vace_blocks.0.self_attn.q.weight", "vace_blocks.3.ffn.2.weight", "vace_blocks.0.before_proj.weight",
                "vace_blocks.7.after_proj.weight"):
        assert is_block_linear(key), key
    for key in ("vace_patch_embedding.weight", "vace_blocks.0.modulation", "vace_blocks.0.after_proj.bias",
                "blocks.0.after_proj.weight"):
        assert not is_block_linear(key), key


@pytest.mark.parametrize("layout", ["lightx2v-fp8", "comfyui-fp8"])
def test_fp8_vace_stores_vace_linears_quantized(tiny_model, layout):
    """LightX2V's VACE weights (WanVaceTransformerAttentionBlock) load before/after_proj with the blocks' mm_type."""
    state = load_file(next(tiny_model("wan2.1", "vace", layout).glob("*.safetensors")))
    for key in ("vace_blocks.0.before_proj.weight", "vace_blocks.1.after_proj.weight", "vace_blocks.1.cross_attn.q.weight"):
        assert state[key].dtype == torch.float8_e4m3fn, key
    assert state["vace_patch_embedding.weight"].dtype == torch.bfloat16


# Keys that give a variant away: (variant name in the error, stored keys to add).
UNIMPLEMENTED = {
    "s2v": ("Wan2.2-S2V", {"casual_audio_encoder.encoder.conv2.conv.weight": (8, 8),
                           "audio_injector.injector.0.q.weight": (8, 8)}),
    "s2v-prefixed": ("Wan2.2-S2V", {"casual_audio_encoder.weights": (1, 8), "frame_packer.proj.weight": (8, 8)}),
    "camera": ("camera control", {"control_adapter.conv.weight": (8, 8)}),
}


@pytest.mark.parametrize("name", UNIMPLEMENTED)
def test_variant_we_do_not_implement_is_refused_by_name(tiny_model, tmp_path, name):
    variant, extra = UNIMPLEMENTED[name]
    src = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    prefix = "model.diffusion_model." if name.endswith("prefixed") else ""  # as ComfyUI saves a whole checkpoint
    state = {**load_file(src), **{k: torch.zeros(s, dtype=torch.bfloat16) for k, s in extra.items()}}
    save_file({prefix + k: v for k, v in state.items()}, tmp_path / src.name)
    line = assert_one_line_error(["inspect", tmp_path / src.name], variant, *(prefix + k for k in extra))
    assert "does not implement" in line


def test_animate_checkpoint_is_never_read_as_t2v(tiny_model, tmp_path):
    """A base DiT plus Animate's modules (diffusers names) is Animate: refused or read as animate, never t2v."""
    folder = tiny_model("wan2.1", "t2v", "diffusers")
    state = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    extra = {"pose_patch_embedding.weight": torch.zeros(256, 16, 1, 2, 2), "face_encoder.conv2.weight": torch.zeros(8, 8, 3),
             "motion_encoder.motion_synthesis_weight": torch.zeros(8, 8), "face_adapter.0.to_q.weight": torch.zeros(8, 8)}
    save_file({**state, **extra}, tmp_path / "animate.safetensors")
    r = run_cli("inspect", tmp_path / "animate.safetensors", "--json")
    if r.exit_code == 0:
        assert r.json()["task"] == "animate"
    else:
        assert r.exit_code == 2 and "Animate" in r.stderr and all(k in r.stderr for k in extra), r.stderr


@pytest.mark.parametrize("key,needle", [
    ("vace_blocks.0.after_proj.weight", "vace_patch_embedding"),  # an official VACE key without the rest
    ("vace_blocks.0.proj.weight", "reads as t2v"),  # a key inside VACE's modules that no VACE model has
])
def test_partial_vace_is_refused_not_ignored(tiny_model, tmp_path, key, needle):
    src = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    path = tmp_path / src.name
    save_file({**load_file(src), key: torch.zeros(256, 256, dtype=torch.bfloat16)}, path)
    assert_one_line_error(["inspect", path], key, "VACE", needle)


def test_two_experts_with_vace_blocks_are_refused(tiny_model, tmp_path):
    """Wan2.2 Fun-VACE (VACE blocks on both A14B experts) is not Wan2.1-VACE: one line naming what is run."""
    folder = shutil.copytree(tiny_model("wan2.2", "t2v", "lightx2v-bf16"), tmp_path / "model")
    block = {k.removeprefix("blocks.0."): v for k, v in load_file(next(folder.rglob("*high_noise*.safetensors"))).items()
             if k.startswith("blocks.0.")}
    vace = {f"vace_blocks.0.{k}": v for k, v in block.items()}
    vace.update({f"vace_blocks.0.{p}_proj.{s}": torch.zeros((256, 256) if s == "weight" else (256,), dtype=torch.bfloat16)
                 for p in ("before", "after") for s in ("weight", "bias")})
    vace["vace_patch_embedding.weight"] = torch.zeros(256, VACE_IN_DIM, 1, 2, 2, dtype=torch.bfloat16)
    vace["vace_patch_embedding.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    for f in folder.rglob("*.safetensors"):
        save_file({**load_file(f), **vace}, f)
    assert_one_line_error(["inspect", folder], "two experts with VACE blocks", "Wan2.1-VACE")
