"""LightX2V configs: file selection (symmetric expert precedence), `//` comments, sampling keys.

Facts: lightx2v-formats.md §1 (keys, schemes), §3 (`sample_guide_scale[0]` while high-noise,
`[1]` while low-noise; distill configs); wan-architecture.md §2 (official defaults, guide as (low, high)).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.export.helpers import assert_one_line_error
from wanrt.engines.errors import WanrtError
from wanrt.export.checkpoint.resolve import resolve_model


def expert_files(tiny_model, layout: str) -> dict[str, Path]:
    root = tiny_model("wan2.2", "t2v", layout)
    return {e: next((root / f"{e}_model").glob("*.safetensors")) for e in ("high_noise", "low_noise")}


def write_config(path: Path, cfg: dict, comment: str = "") -> Path:
    path.write_text(comment + json.dumps(cfg, indent=2))
    return path


@pytest.mark.parametrize("quantized", [True, False])
def test_moe_experts_from_config_keys(tiny_model, tmp_path, quantized):
    fp8, bf16 = expert_files(tiny_model, "lightx2v-fp8"), expert_files(tiny_model, "lightx2v-bf16")
    cfg = write_config(tmp_path / "moe.json", {
        "dit_quantized": quantized, "dit_quant_scheme": "fp8-sgl",
        "high_noise_quantized_ckpt": str(fp8["high_noise"]), "low_noise_quantized_ckpt": str(fp8["low_noise"]),
        "high_noise_original_ckpt": str(bf16["high_noise"]), "low_noise_original_ckpt": str(bf16["low_noise"]),
    })
    m = resolve_model(tiny_model("wan2.2", "t2v", "official"), cfg)
    want = fp8 if quantized else bf16
    assert [(e.name, e.files) for e in m.experts] == [("high_noise", [want["high_noise"]]), ("low_noise", [want["low_noise"]])]
    assert {e.view.precision for e in m.experts} == {"fp8_e4m3" if quantized else "bf16"}
    assert m.text_encoder is not None and m.text_encoder.parent == tiny_model("wan2.2", "t2v", "official")


def test_low_noise_original_ckpt_honoured_when_quantized(tiny_model, tmp_path):
    """LightX2V skips low_noise_original_ckpt when dit_quantized (and falls back to low_noise_model/); we do not."""
    fp8 = expert_files(tiny_model, "lightx2v-fp8")
    cfg = write_config(tmp_path / "moe.json", {
        "dit_quantized": True, "dit_quant_scheme": "fp8-vllm",
        "high_noise_original_ckpt": str(fp8["high_noise"]), "low_noise_original_ckpt": str(fp8["low_noise"]),
    })
    m = resolve_model(tiny_model("wan2.2", "t2v", "official"), cfg)
    assert [e.files for e in m.experts] == [[fp8["high_noise"]], [fp8["low_noise"]]]


def test_single_dit_quantized_ckpt_and_comments(tiny_model, tmp_path):
    fp8 = next(tiny_model("wan2.1", "i2v", "lightx2v-fp8").glob("*.safetensors"))
    cfg = write_config(tmp_path / "distill.json", {
        "infer_steps": 4, "target_video_length": 33, "target_height": 480, "target_width": 832,
        "sample_guide_scale": 6, "sample_shift": 5, "enable_cfg": False,
        "denoising_step_list": [1000, 750, 500, 250],
        "dit_quantized": True, "dit_quant_scheme": "fp8-sgl",
        "dit_quantized_ckpt": str(fp8), "dit_original_ckpt": "/not/used/because/quantized.safetensors",
    }, comment="// LightX2V wan_i2v_distill_fp8_4step_cfg.json, trimmed\n")
    m = resolve_model(tiny_model("wan2.1", "i2v", "official"), cfg)
    assert (m.family, m.task, m.experts[0].files) == ("wan2.1", "i2v", [fp8])
    s = m.sampling
    assert (s.sampler, s.steps, s.denoising_step_list, s.enable_cfg) == ("distill", 4, [1000, 750, 500, 250], False)
    assert (s.shift, s.guide_scale, s.frames, s.height, s.width) == (5.0, (6.0, 6.0), 33, 480, 832)
    assert s.max_area == 480 * 832  # i2v: the target area follows the configured size
    assert m.config["dit_quant_scheme"] == "fp8-sgl" and m.config_path == cfg


def test_moe_sampling_keys_become_low_high_guide(tiny_model, tmp_path):
    # configs/wan22/wan_moe_t2v.json: sample_guide_scale [4.0, 3.0] = [high, low]; official T2V-A14B (low, high) = (3.0, 4.0)
    cfg = write_config(tmp_path / "wan_moe_t2v.json", {
        "infer_steps": 40, "target_video_length": 81, "target_height": 720, "target_width": 1280,
        "sample_guide_scale": [4.0, 3.0], "sample_shift": 12.0, "enable_cfg": True, "boundary": 0.875, "fps": 16,
    })
    s = resolve_model(tiny_model("wan2.2", "t2v", "official"), cfg).sampling
    assert (s.sampler, s.steps, s.guide_scale, s.shift, s.boundary, s.enable_cfg) == ("unipc", 40, (3.0, 4.0), 12.0, 0.875, True)


def test_moe_distill_config(tiny_model, tmp_path):
    fp8 = expert_files(tiny_model, "lightx2v-fp8")
    text = """{
    // configs/distill/wan22/wan_moe_i2v_distill_quant.json (paths replaced)
    "infer_steps": 4, "sample_guide_scale": [3.5, 3.5], "sample_shift": 5.0, "enable_cfg": false,
    "boundary_step_index": 2, "denoising_step_list": [1000, 750, 500, 250],
    /* quantized DiT */ "dit_quantized": true, "dit_quant_scheme": "fp8-sgl",
    "high_noise_quantized_ckpt": "%s", "low_noise_quantized_ckpt": "%s", "note": "a // in a string stays"
}""" % (fp8["high_noise"], fp8["low_noise"])
    cfg = tmp_path / "distill.json"
    cfg.write_text(text)
    m = resolve_model(tiny_model("wan2.2", "t2v", "official"), cfg)
    assert m.config["note"] == "a // in a string stays"
    s = m.sampling
    assert (s.sampler, s.steps, s.boundary_step_index, s.enable_cfg, s.guide_scale) == ("distill", 4, 2, False, (3.5, 3.5))


@pytest.mark.parametrize("family, task, want", [
    ("wan2.1", "t2v", dict(steps=50, shift=5.0, guide_scale=(5.0, 5.0), frames=81, fps=16, boundary=None)),
    ("wan2.1", "i2v", dict(steps=40, shift=5.0, guide_scale=(5.0, 5.0), frames=81, fps=16, boundary=None)),
    ("wan2.1", "flf2v", dict(steps=50, shift=16.0, guide_scale=(5.0, 5.0), frames=81, fps=16, boundary=None)),
    ("wan2.2", "t2v", dict(steps=40, shift=12.0, guide_scale=(3.0, 4.0), frames=81, fps=16, boundary=0.875)),
    ("wan2.2", "i2v", dict(steps=40, shift=5.0, guide_scale=(3.5, 3.5), frames=81, fps=16, boundary=0.900)),
    ("wan2.2", "ti2v", dict(steps=50, shift=5.0, guide_scale=(5.0, 5.0), frames=121, fps=24, boundary=None)),
])
def test_official_defaults_without_config(tiny_model, family, task, want):
    s = resolve_model(tiny_model(family, task, "official")).sampling
    assert {k: getattr(s, k) for k in want} == want
    assert (s.sampler, s.enable_cfg, s.denoising_step_list) == ("unipc", True, None)


def test_config_given_as_the_path(tiny_model, tmp_path):
    root = tiny_model("wan2.1", "t2v", "official")
    bf16 = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    cfg = write_config(tmp_path / "run.json", {"model_path": str(root), "dit_original_ckpt": str(bf16), "sample_shift": 8})
    m = resolve_model(cfg)
    assert m.experts[0].files == [bf16] and m.sampling.shift == 8.0
    assert m.vae == root / "Wan2.1_VAE.pth" and m.tokenizer == root / "google" / "umt5-xxl"


def test_companion_key_of_the_wrong_kind(tiny_model, tmp_path):
    root = tiny_model("wan2.1", "t2v", "official")
    cfg = write_config(tmp_path / "c.json", {"t5_original_ckpt": str(root / "Wan2.1_VAE.pth")})
    with pytest.raises(WanrtError, match="t5_original_ckpt points at .*Wan2.1_VAE.pth, which is not a T5"):
        resolve_model(root, cfg)


def test_paths_inside_a_model_folder(tiny_model):
    root = tiny_model("wan2.2", "t2v", "official")
    shard = next((root / "low_noise_model").glob("diffusion_pytorch_model-00001-*.safetensors"))
    for path in (shard, root / "low_noise_model", root / "low_noise_model" / "config.json"):
        m = resolve_model(path)
        assert (m.family, m.task, [e.name for e in m.experts]) == ("wan2.2", "t2v", ["dit"])
        assert len(m.experts[0].files) == 2  # a shard stands for its index
        assert m.text_encoder == root / "models_t5_umt5-xxl-enc-bf16.pth" and m.vae == root / "Wan2.1_VAE.pth"
        assert any("low_noise expert of a Wan2.2 A14B model" in n for n in m.notes)
        assert m.sampling.boundary is None and m.sampling.shift == 12.0
    index = root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    assert [e.name for e in resolve_model(index).experts] == ["dit"]


def test_pth_dit_in_a_folder(tiny_model, tmp_path):
    """LightX2V's legacy `distill_model.pt` (a `state_dict` wrapper) is found, typed and read like safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tiny_model("wan2.1", "t2v", "lightx2v-bf16")
    state = load_file(next(src.glob("*.safetensors")))
    torch.save({"state_dict": state}, tmp_path / "distill_model.pt")
    shutil.copy(src / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path)
    m = resolve_model(tmp_path)
    assert m.experts[0].files == [tmp_path / "distill_model.pt"] and m.text_encoder == tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    assert (m.family, m.task, m.experts[0].view.precision) == ("wan2.1", "t2v", "bf16")
    assert all(torch.equal(m.experts[0].view.load(k, torch.bfloat16), t) for k, t in state.items())


# compiled-path-facts.md "Peers read for real": these platform schemes load the same per-channel
# `weight_scale [out, 1]` file layout as fp8-vllm / int8-vllm (LightX2V's lightx2v_platform/ops/mm/*).
PLATFORM_SCHEMES = {"int8-npu": "int8", "int8-tmo": "int8", "int8-vllm-hygon-dcu": "int8", "int8-iluvatar": "int8",
                    "fp8-musa": "fp8", "fp8-intel-xpu": "fp8"}


@pytest.mark.parametrize("scheme", sorted(PLATFORM_SCHEMES))
def test_platform_quant_schemes_read_the_per_channel_layout(tiny_model, tmp_path, scheme):
    kind = PLATFORM_SCHEMES[scheme]
    file = next(tiny_model("wan2.1", "t2v", f"lightx2v-{kind}").glob("*.safetensors"))
    cfg = write_config(tmp_path / "q.json", {"dit_quantized": True, "dit_quant_scheme": scheme, "dit_quantized_ckpt": str(file)})
    m = resolve_model(tiny_model("wan2.1", "t2v", "official"), cfg)
    assert m.experts[0].files == [file]
    assert (m.experts[0].view.precision, m.experts[0].view.scale) == ({"int8": "int8", "fp8": "fp8_e4m3"}[kind], "per_channel")
    other = next(tiny_model("wan2.1", "t2v", "lightx2v-fp8" if kind == "int8" else "lightx2v-int8").glob("*.safetensors"))
    cfg = write_config(tmp_path / "wrong.json", {"dit_quantized": True, "dit_quant_scheme": scheme, "dit_quantized_ckpt": str(other)})
    with pytest.raises(WanrtError, match=f"dit_quant_scheme '{scheme}' reads"):
        resolve_model(tiny_model("wan2.1", "t2v", "official"), cfg)


def test_keys_read_but_not_acted_on_get_a_note(tiny_model, tmp_path):
    root = tiny_model("wan2.1", "i2v", "official")
    cfg = write_config(tmp_path / "c.json", {
        "t5_quant_scheme": "int8-vllm", "clip_quantized": False, "clip_quant_scheme": "fp8-sgl", "clip_quantized_ckpt": "clip-fp8.pth",
        "use_tae": True, "tae_path": "taew2_1.pth", "vae_name": "Wan2.1_VAE.pth", "use_tiling_vae": False,
    })
    notes = resolve_model(root, cfg).notes
    assert "t5_quant_scheme is not used: t5_quantized is not true (LightX2V reads the quantized file only then)" in notes
    assert "clip_quant_scheme, clip_quantized_ckpt are not used: clip_quantized is not true (LightX2V reads the quantized file only then)" in notes
    assert any(n.startswith("use_tae, tae_path are ignored:") for n in notes)
    assert any(n.startswith("vae_name is ignored: the VAE is found by its tensors") for n in notes)
    quiet = write_config(tmp_path / "q.json", {"clip_quantized": False, "use_tae": False})
    assert not any("ignored" in n or "not used" in n for n in resolve_model(root, quiet).notes)


def test_quantized_ckpt_without_dit_quantized_is_not_used(tiny_model, tmp_path):
    """LightX2V reads `*_quantized_ckpt` only with `dit_quantized: true`; without it the original weights are used."""
    root = tiny_model("wan2.1", "t2v", "official")
    fp8 = next(tiny_model("wan2.1", "t2v", "lightx2v-fp8").glob("*.safetensors"))
    cfg = write_config(tmp_path / "c.json", {"dit_quantized_ckpt": str(fp8)})
    m = resolve_model(root, cfg)
    assert m.experts[0].view.precision == "fp32" and fp8 not in m.experts[0].files
    assert "dit_quantized_ckpt is not used: dit_quantized is not true (LightX2V reads the quantized file only then)" in m.notes
    moe = tiny_model("wan2.2", "t2v", "official")
    cfg = write_config(tmp_path / "moe.json", {"low_noise_quantized_ckpt": str(expert_files(tiny_model, "lightx2v-fp8")["low_noise"])})
    assert "low_noise_quantized_ckpt is not used: dit_quantized is not true (LightX2V reads the quantized file only then)" in resolve_model(moe, cfg).notes


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


def test_config_key_pointing_at_a_missing_file(tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{\n  // the distilled model\n  "dit_original_ckpt": "nowhere/wan2.1_t2v_14b_lightx2v_4step.safetensors"\n}\n')
    assert_one_line_error(["inspect", tiny_model("wan2.1", "t2v", "official"), "--config", cfg],
                          cfg, "dit_original_ckpt", "nowhere/wan2.1_t2v_14b_lightx2v_4step.safetensors", "does not exist")
