"""Fixtures: tiny Wan DiT weights under official names (wan-architecture facts) and LoRA writers.

Base files are written with the safetensors library itself, so our reader/writer are not
their own oracle.  Dims follow the project's tiny model: head_dim 128, 2 heads, ffn 512.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

DIM, FFN, LAYERS, IN_DIM, OUT_DIM, TEXT_DIM, FREQ_DIM = 256, 512, 2, 16, 16, 64, 256
I2V_IN_DIM, CLIP_DIM = 36, 128  # Wan2.1 i2v: 16 noise + 4 mask + 16 image-latent channels; CLIP width (1280 in the real model)


def official_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, i2v: bool = False) -> dict[str, torch.Tensor]:
    """Every key of an official Wan2.1 t2v (or i2v: k_img/v_img/norm_k_img and the `img_emb` MLPProj) `WanModel`, tiny and random."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    sd = {
        "patch_embedding.weight": r(DIM, I2V_IN_DIM if i2v else IN_DIM, 1, 2, 2),
        "patch_embedding.bias": r(DIM),
        "text_embedding.0.weight": r(DIM, TEXT_DIM),
        "text_embedding.0.bias": r(DIM),
        "text_embedding.2.weight": r(DIM, DIM),
        "text_embedding.2.bias": r(DIM),
        "time_embedding.0.weight": r(DIM, FREQ_DIM),
        "time_embedding.0.bias": r(DIM),
        "time_embedding.2.weight": r(DIM, DIM),
        "time_embedding.2.bias": r(DIM),
        "time_projection.1.weight": r(6 * DIM, DIM),
        "time_projection.1.bias": r(6 * DIM),
        "head.head.weight": r(OUT_DIM * 4, DIM),
        "head.head.bias": r(OUT_DIM * 4),
        "head.modulation": r(1, 2, DIM),
    }
    if i2v:  # img_emb.proj: LayerNorm(clip), Linear(clip, clip), GELU, Linear(clip, dim), LayerNorm(dim)
        sd.update({
            "img_emb.proj.0.weight": r(CLIP_DIM), "img_emb.proj.0.bias": r(CLIP_DIM),
            "img_emb.proj.1.weight": r(CLIP_DIM, CLIP_DIM), "img_emb.proj.1.bias": r(CLIP_DIM),
            "img_emb.proj.3.weight": r(DIM, CLIP_DIM), "img_emb.proj.3.bias": r(DIM),
            "img_emb.proj.4.weight": r(DIM), "img_emb.proj.4.bias": r(DIM),
        })
    for n in range(LAYERS):
        p = f"blocks.{n}."
        sd[p + "modulation"] = r(1, 6, DIM)
        for attn in ("self_attn", "cross_attn"):
            for m in "qkvo":
                sd[f"{p}{attn}.{m}.weight"] = r(DIM, DIM)
                sd[f"{p}{attn}.{m}.bias"] = r(DIM)
            sd[f"{p}{attn}.norm_q.weight"] = r(DIM)
            sd[f"{p}{attn}.norm_k.weight"] = r(DIM)
        if i2v:
            for m in ("k_img", "v_img"):
                sd[f"{p}cross_attn.{m}.weight"] = r(DIM, DIM)
                sd[f"{p}cross_attn.{m}.bias"] = r(DIM)
            sd[f"{p}cross_attn.norm_k_img.weight"] = r(DIM)
        sd[p + "norm3.weight"] = r(DIM)
        sd[p + "norm3.bias"] = r(DIM)
        sd[p + "ffn.0.weight"] = r(FFN, DIM)
        sd[p + "ffn.0.bias"] = r(FFN)
        sd[p + "ffn.2.weight"] = r(DIM, FFN)
        sd[p + "ffn.2.bias"] = r(DIM)
    return sd


@pytest.fixture(scope="session")
def base_sd() -> dict[str, torch.Tensor]:
    return official_state_dict()


@pytest.fixture(scope="session")
def base_file(tmp_path_factory, base_sd) -> Path:
    path = tmp_path_factory.mktemp("base") / "wan_t2v_fp32.safetensors"
    save_file(base_sd, str(path))
    return path


@pytest.fixture(scope="session")
def base_sd_bf16(base_sd) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in base_sd.items()}


@pytest.fixture(scope="session")
def base_file_bf16(tmp_path_factory, base_sd_bf16) -> Path:
    path = tmp_path_factory.mktemp("base16") / "wan_t2v_bf16.safetensors"
    save_file(base_sd_bf16, str(path))
    return path


@pytest.fixture
def write_file(tmp_path):
    """Write a dict of tensors with the safetensors library; returns the path."""

    def write(tensors: dict[str, torch.Tensor], name: str = "lora.safetensors") -> Path:
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    return write


def close_mismatches(got: dict, want: dict, atol: float, rtol: float) -> list[str]:
    """Keys whose tensors differ by more than atol + rtol*|want| anywhere (with the worst error)."""
    bad = []
    for k, w in want.items():
        g = got[k].to(torch.float64)
        w = w.to(torch.float64)
        if g.shape != w.shape:
            bad.append(f"{k}: shape {list(g.shape)} != {list(w.shape)}")
            continue
        excess = (g - w).abs() - (atol + rtol * w.abs())
        if excess.numel() and float(excess.max()) > 0:
            bad.append(f"{k}: max |diff| {float((g - w).abs().max()):.3g}")
    return bad


@pytest.fixture
def assert_close():
    """assert_close(got, want, atol, rtol) for tensors or dicts of tensors (cheap on big dicts)."""

    def check(got, want, atol: float = 2e-6, rtol: float = 1e-6) -> None:
        if isinstance(want, dict):
            assert set(got) >= set(want), sorted(set(want) - set(got))[:5]
            bad = close_mismatches(got, want, atol, rtol)
        else:
            bad = close_mismatches({"tensor": got}, {"tensor": want}, atol, rtol)
        assert not bad, bad[:5]

    return check


def lightx2v_lora(base_sd, targets: list[str], rank: int, seed: int, std: float = 0.05):
    """A LightX2V-form LoRA (`diffusion_model.<module>.lora_up/down.weight`) on `targets`, and its float64 deltas up @ down."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for key in targets:
        o, i = base_sd[key].shape
        up, down = torch.randn(o, rank, generator=g) * std, torch.randn(rank, i, generator=g) * std
        m = key[: -len(".weight")]
        sd[f"diffusion_model.{m}.lora_up.weight"], sd[f"diffusion_model.{m}.lora_down.weight"] = up, down
        deltas[key] = up.double() @ down.double()
    return sd, deltas


@pytest.fixture
def make_lora():
    return lightx2v_lora
