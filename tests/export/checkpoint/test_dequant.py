"""fp8 / int8 views dequantize as the formats define (lightx2v-formats.md §1, peer-formats.md §2).

Raw tensors are read with the safetensors library and dequantized here, independently:
LightX2V: `w = q * weight_scale` with weight_scale [out,1]; ComfyUI: `w = q * scale_weight` (scalar).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.checkpoint.view import CheckpointView, is_block_linear, open_source

BLOCK_LINEAR = (".self_attn.q.", ".self_attn.k.", ".self_attn.v.", ".self_attn.o.", ".cross_attn.q.", ".cross_attn.k.",
                ".cross_attn.v.", ".cross_attn.o.", ".cross_attn.k_img.", ".cross_attn.v_img.", ".ffn.0.", ".ffn.2.")


def raw_tensors(files) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("layout, qtype, scale_suffix", [
    ("lightx2v-fp8", torch.float8_e4m3fn, ".weight_scale"),
    ("lightx2v-int8", torch.int8, ".weight_scale"),
    ("comfyui-fp8", torch.float8_e4m3fn, ".scale_weight"),
])
def test_quantized_view_equals_independent_dequantization(tiny_model, layout, qtype, scale_suffix):
    expert = resolve_model(tiny_model("wan2.1", "i2v", layout)).experts[0]
    raw = raw_tensors(expert.files)
    n_quantized = 0
    for key in expert.view:
        ref = expert.view[key]
        got = ref.load()
        stored = raw[key]
        linear = key.startswith("blocks.") and key.endswith(".weight") and any(m in key for m in BLOCK_LINEAR)
        assert ref.quantized == linear == (stored.dtype == qtype), key
        if not linear:
            assert torch.equal(got, stored.float()), key
            continue
        n_quantized += 1
        scale = raw[key[: -len(".weight")] + scale_suffix].float()
        if layout == "comfyui-fp8":
            assert scale.shape == ()  # one scale per tensor
            want = stored.float() * scale
        else:
            assert scale.shape == (stored.shape[0], 1)  # one scale per output channel
            want = stored.float() * scale
        assert torch.equal(got, want), key
        for dtype in (torch.bfloat16, torch.float16):  # computed directly in dtype: must equal the fp32 product cast
            assert torch.equal(ref.load(dtype), want.to(dtype)), (key, dtype)
    assert n_quantized == 2 * 12  # 2 layers x (q,k,v,o self + q,k,v,o cross + k_img, v_img + ffn.0, ffn.2)


@pytest.mark.parametrize("layout", ["lightx2v-fp8", "lightx2v-int8"])
def test_lightx2v_files_follow_the_converter_formula(tiny_model, layout):
    """LightX2V's converter (`tools/convert/quant/quant.py`) on the fp32 official weights of the same seed:
    scale = amax(|w|, dim=1).clamp(1e-5) / qmax, kept in the source weight's dtype (fp32) as `weight_scale` [out, 1];
    codes = w / scale clipped to +-448 and rounded to nearest (fp8 e4m3), or rounded and clamped to [-128, 127] (int8);
    every other tensor cast to bf16 (`--non_linear_dtype torch.bfloat16`).  Rounding reference: ml_dtypes / numpy."""
    quant = resolve_model(tiny_model("wan2.2", "t2v", layout)).experts[1]
    official = resolve_model(tiny_model("wan2.2", "t2v", "official")).experts[1]  # same seed: same fp32 values
    raw = raw_tensors(quant.files)
    qmax = 448.0 if layout == "lightx2v-fp8" else 127.0
    n_quantized = 0
    for key in official.view:
        w = official.view.load(key)
        if not is_block_linear(key):
            assert raw[key].dtype == torch.bfloat16 and torch.equal(raw[key], w.to(torch.bfloat16)), key
            continue
        n_quantized += 1
        scale = raw[key[: -len(".weight")] + ".weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1), key
        want = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
        assert torch.equal(scale, want), key
        x = (w / want).numpy()
        if layout == "lightx2v-fp8":
            codes = np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        else:
            codes = np.clip(np.round(x), -128, 127)
        np.testing.assert_array_equal(raw[key].float().numpy(), codes, err_msg=key)
    assert n_quantized == 2 * 10  # 2 layers x (q,k,v,o self + q,k,v,o cross + ffn.0, ffn.2); Wan2.2 has no k_img/v_img


def test_comfyui_marker_and_per_tensor_scale(tiny_model):
    expert = resolve_model(tiny_model("wan2.1", "t2v", "comfyui-fp8")).experts[0]
    official = resolve_model(tiny_model("wan2.1", "t2v", "official")).experts[0]
    raw = raw_tensors(expert.files)
    assert raw["scaled_fp8"].dtype == torch.float8_e4m3fn and raw["scaled_fp8"].shape == (2,)
    key = "blocks.1.ffn.0.weight"
    w = official.view.load(key)
    assert raw["blocks.1.ffn.0.scale_weight"].dtype == torch.float32
    assert torch.equal(raw["blocks.1.ffn.0.scale_weight"], w.abs().max() / 448.0)
    err = (expert.view.load(key) - w).abs()
    assert bool((err <= w.abs() * 2**-4 + w.abs().max() / 448.0 * 2**-9).all())


def _linear_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "blocks.0.self_attn.q.weight": (torch.randn(8, 4, generator=g) * 0.1).to(dtype),
        "blocks.0.self_attn.q.bias": torch.randn(8, generator=g) * 0.01,
        "blocks.0.ffn.0.weight": (torch.randn(6, 4, generator=g) * 0.1).to(dtype),
    }


def test_unscaled_fp8_weights_load_with_scale_one(tmp_path):
    state = _linear_state(torch.float8_e4m3fn)
    save_file(state, tmp_path / "plain_fp8.safetensors")
    view = CheckpointView([open_source(tmp_path / "plain_fp8.safetensors")])
    assert view.precision == "fp8_e4m3" and view.scale is None
    for k, t in state.items():
        assert view[k].scale_key is None
        assert torch.equal(view.load(k), t.float())


def test_scale_input_is_never_taken_for_the_weight_scale(tmp_path):
    state = _linear_state(torch.float8_e4m3fn)
    state["blocks.0.self_attn.q.scale_input"] = torch.tensor(3.0)  # activation scale (ComfyUI)
    state["blocks.0.self_attn.q.scale_weight"] = torch.tensor(0.5)
    state["blocks.0.ffn.0.scale_input"] = torch.tensor(7.0)  # an input scale but no weight scale
    save_file(state, tmp_path / "comfy.safetensors")
    view = CheckpointView([open_source(tmp_path / "comfy.safetensors")])
    q, f = view["blocks.0.self_attn.q.weight"], view["blocks.0.ffn.0.weight"]
    assert (q.scale_key, q.scale_layout) == ("blocks.0.self_attn.q.scale_weight", "per_tensor")
    assert torch.equal(q.load(), state["blocks.0.self_attn.q.weight"].float() * 0.5)
    assert f.scale_key is None and torch.equal(f.load(), state["blocks.0.ffn.0.weight"].float())
    assert view.layout == "comfyui"


def test_iter_tensors_streams_every_tensor_once(tiny_model):
    expert = resolve_model(tiny_model("wan2.2", "ti2v", "lightx2v-int8")).experts[0]
    seen = {}
    for k, t in expert.view.iter_tensors(torch.float16):
        assert k not in seen and t.dtype == torch.float16
        seen[k] = t
    assert set(seen) == set(expert.view)
    assert all(torch.equal(seen[k], expert.view.load(k, torch.float16)) for k in seen)
