"""Merging into fp8 / int8 checkpoints: dequantize, merge, requantize with fresh scales in the same layout.

The quantized base files are written here with plain torch following the format facts
(lightx2v-formats.md §1: per-output-channel scale = amax/448 or amax/127, `<layer>.weight_scale`
[out, 1]; ComfyUI: per-tensor `scale_weight` + `scaled_fp8` marker).  The oracle is: merge the
LoRA into the bf16 original, then quantize; both paths must agree within the formats' error.
"""

from __future__ import annotations

import re

import pytest
import torch

from wanrt.calibration.quant import ERROR_ROW_STRIDE
from wanrt.export.checkpoint.view import CheckpointView, open_source
from wanrt.export.lora import LoraSpec, apply_loras

from .conftest import lightx2v_lora

BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight$")
QMAX = {"fp8": 448.0, "int8": 127.0}
RANK = 8
TARGETS = ["blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.weight", "blocks.1.ffn.0.weight", "blocks.1.ffn.2.weight"]


def quantize_ref(w: torch.Tensor, fmt: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The format facts in plain torch: scale = amax / qmax, codes rounded to nearest."""
    w = w.float()
    amax = (w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()).clamp(min=1e-5)
    scale = amax / QMAX[fmt]
    if fmt == "fp8":
        return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale


def bound(fmt: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest rounding error per element: fp8 e4m3 half-ulp (2^-4 relative, 2^-10*scale in subnormals); int8 scale/2."""
    s = scale.double()
    if fmt == "fp8":
        return torch.maximum(w.double().abs() * 2**-4, s * 2**-10) * (1 + 1e-5) + 1e-12
    return (s / 2).expand_as(w).double() * (1 + 1e-5) + 1e-12


def quantized_file(sd_bf16, fmt: str, comfyui: bool, path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd_bf16.items():
        if BLOCK_LINEAR.match(k):
            q, s = quantize_ref(v, fmt, per_channel=not comfyui)
            out[k] = q
            out[k[: -len(".weight")] + (".scale_weight" if comfyui else ".weight_scale")] = s.reshape(()) if comfyui else s
        else:
            out[k] = v
    if comfyui:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    from safetensors.torch import save_file

    save_file(out, str(path))
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory, base_sd_bf16):
    sd, deltas = lightx2v_lora(base_sd_bf16, TARGETS, RANK, seed=7)
    deltas = {k: d.float() for k, d in deltas.items()}
    path = tmp_path_factory.mktemp("qlora") / "lora.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path, deltas


@pytest.mark.parametrize("fmt,comfyui", [("fp8", False), ("int8", False), ("fp8", True)])
def test_merge_into_quantized_matches_merge_then_quantize(fmt, comfyui, base_sd_bf16, lora, tmp_path):
    stored = quantized_file(base_sd_bf16, fmt, comfyui, tmp_path / "q.safetensors")
    view = CheckpointView([open_source(tmp_path / "q.safetensors")])
    path, deltas = lora
    strength = 0.8
    merged = apply_loras(view, [LoraSpec(path, strength)], "dit")
    assert merged.patched_keys == sorted(TARGETS)
    for key in TARGETS:
        ref = merged[key]
        assert ref.dtype == ("fp8_e4m3" if fmt == "fp8" else "int8")
        q2, s2 = ref.load_stored()
        assert q2.dtype == stored[key].dtype and s2.dtype == torch.float32
        assert s2.numel() == (1 if comfyui else q2.shape[0])  # same layout, fresh scales
        scale_key = key[: -len(".weight")] + (".scale_weight" if comfyui else ".weight_scale")
        s1 = stored[scale_key].reshape(-1, 1) if not comfyui else stored[scale_key]
        deq1 = stored[key].float() * s1  # the stored base, dequantized
        merged_deq = deq1 + strength * deltas[key]
        # fresh scales: amax of the merged (dequantized) weight
        want_s2 = (merged_deq.abs().amax(dim=1, keepdim=True) if not comfyui else merged_deq.abs().amax()).clamp(min=1e-5) / QMAX[fmt]
        torch.testing.assert_close(s2.reshape(want_s2.shape), want_s2, rtol=1e-5, atol=0)
        a = merged.load(key).double()  # merged into the quantized checkpoint
        assert torch.equal(a, (q2.float() * s2.reshape(want_s2.shape)).double())
        # oracle: merge into the bf16 original, then quantize
        w = base_sd_bf16[key].float()
        qb, sb = quantize_ref(w + strength * deltas[key], fmt, per_channel=not comfyui)
        b = (qb.float() * sb).double()
        limit = bound(fmt, w, s1) + bound(fmt, merged_deq, want_s2) + bound(fmt, w + strength * deltas[key], sb)
        assert bool(((a - b).abs() <= limit).all()), f"{key}: max excess {float(((a - b).abs() - limit).max())}"
        # the reported requantization error is that of the fresh quantization (on every ERROR_ROW_STRIDE-th row)
        err = merged.report.requant_errors[key]
        rows = slice(None, None, ERROR_ROW_STRIDE)
        d = (a - merged_deq.double())[rows]
        assert err.rel_rms == pytest.approx(float(d.norm() / merged_deq.double()[rows].norm()), rel=1e-3)
        assert err.max_abs == pytest.approx(float(d.abs().max()), rel=1e-3)
    summary = merged.report.requant
    assert summary.tensors == len(TARGETS) and 0 < summary.overall_rel_rms < (0.05 if fmt == "fp8" else 0.01)
    # unpatched quantized tensors are the base's own refs (codes and scales untouched)
    assert merged["blocks.1.self_attn.k.weight"] is view["blocks.1.self_attn.k.weight"]
