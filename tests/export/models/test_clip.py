"""The CLIP ViT-H/14 vision tower: official key layout, equality with transformers' CLIPVisionModel, loading."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from wanrt.engines.errors import CheckpointError, WanrtError
from wanrt.export.checkpoint.companion_keys import hf_clip_plan, official_clip_to_hf
from wanrt.export.models.clip import CLIPVisionConfig, CLIPVisionEncoder, load_clip_vision

transformers = pytest.importorskip("transformers")


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> bool:
    return float((ours - ref).abs().max()) <= rel * float(ref.abs().max())


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """The `visual.*` keys of wan-architecture.md section 4 (prefix removed), written out independently."""
    shapes = {
        "patch_embedding.weight": (1280, 3, 14, 14), "cls_embedding": (1, 1, 1280), "pos_embedding": (1, 257, 1280),
        "pre_norm.weight": (1280,), "pre_norm.bias": (1280,),
        "post_norm.weight": (1280,), "post_norm.bias": (1280,), "head": (1280, 1024),
    }  # fmt: skip
    for n in range(32):
        for name, (out, inp) in {"attn.to_qkv": (3840, 1280), "attn.proj": (1280, 1280),
                                 "mlp.0": (5120, 1280), "mlp.2": (1280, 5120)}.items():  # fmt: skip
            shapes[f"transformer.{n}.{name}.weight"] = (out, inp)
            shapes[f"transformer.{n}.{name}.bias"] = (out,)
        for norm in ("norm1", "norm2"):
            shapes[f"transformer.{n}.{norm}.weight"] = shapes[f"transformer.{n}.{norm}.bias"] = (1280,)
    return shapes


def test_real_size_visual_keys_and_params_on_meta():
    with torch.device("meta"):
        model = CLIPVisionEncoder(CLIPVisionConfig())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == reference_shapes()
    assert len(state) == 392  # the visual half of the 784-key file
    assert round(sum(math.prod(s) for s in state.values()) / 1e6) == 632  # ViT-H/14 vision tower


def hf_to_official(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModelWithProjection weights under the official `visual.*` names (the production map)."""
    plan = hf_clip_plan({k: tuple(v.shape) for k, v in hf_state.items()}, "test")
    used = {k for m in plan.values() for k in m.stored}
    assert used == set(hf_state) - {"vision_model.embeddings.position_ids"}
    return {k: m.combine([hf_state[s] for s in m.stored]) for k, m in plan.items()}


@pytest.fixture(scope="module")
def hf_pair():
    """A tiny random transformers CLIPVisionModel (exact GELU, eps 1e-5) and our tower with its weights."""
    torch.manual_seed(0)
    cfg = CLIPVisionConfig.tiny()
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=cfg.out_dim,
    )  # fmt: skip
    hf = transformers.CLIPVisionModelWithProjection(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # O(1) activations so every path matters
            scale = 0.5 if p.dim() == 1 or "embedding" in name else 1.0 / math.sqrt(p[0].numel())
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    state = hf_to_official(hf.state_dict())
    with torch.device("meta"):
        ours = CLIPVisionEncoder(cfg)
    ours.load_state_dict(state, strict=True, assign=True)
    return hf, ours.eval(), state


def test_matches_transformers_penultimate_hidden_state(hf_pair):
    hf, ours, _ = hf_pair
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = ours(pixels)
    # hidden_states[0] is the pre_layrnorm output fed to layer 0, hidden_states[i] the output of layer i;
    # with 3 layers, [-2] is the output of layer 2 of 3: Wan's transformer[:-1]
    assert len(hidden) == 4
    assert out.shape == (2, 257, 160) and out.dtype == torch.float32
    assert close(out, hidden[-2]), f"max diff {(out - hidden[-2]).abs().max()}"
    assert not close(out, hidden[-1], 1e-2)  # and not the last block's output


def test_half_precisions_follow_fp32(hf_pair):
    _, ours, state = hf_pair
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ours(pixels)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.device("meta"):
                half = CLIPVisionEncoder(ours.config)
            half.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
            got = half(pixels)
            assert got.dtype == torch.float32
            assert float((got - want).norm() / want.norm()) < (0.01 if dtype == torch.float16 else 0.05), dtype


def test_load_reads_visual_keys_of_full_checkpoint(hf_pair, tmp_path):
    _, ours, state = hf_pair
    full = {"visual." + k: v.to(torch.float16) for k, v in state.items()}
    full |= {"textual.token_embedding.weight": torch.zeros(10, 4, dtype=torch.float16), "log_scale": torch.tensor(4.6)}
    torch.save(full, tmp_path / "clip.pth")
    loaded = load_clip_vision(tmp_path / "clip.pth")
    assert loaded.config == ours.config
    pixels = torch.randn(1, 3, 224, 224)
    with torch.device("meta"):
        rounded = CLIPVisionEncoder(ours.config)
    rounded.load_state_dict({k: v.to(torch.float16).float() for k, v in state.items()}, assign=True)
    with torch.no_grad():
        assert close(loaded(pixels), rounded(pixels), 1e-6)


def test_load_transformers_file_computes_like_transformers(hf_pair, tmp_path):
    hf, ours, state = hf_pair
    hf.save_pretrained(tmp_path)  # model.safetensors + config.json, as a diffusers image_encoder/
    loaded = load_clip_vision(tmp_path / "model.safetensors")
    assert loaded.config == ours.config
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert close(loaded(pixels), hidden[-2])
        # the projection head too: image_embeds = post_norm(CLS of the last layer) @ head
        cls = loaded.post_norm(hidden[-1][:, 0])
        assert close(cls @ loaded.head, hf(pixel_values=pixels).image_embeds)
    back: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        back |= official_clip_to_hf(k, v)
    hf_state = hf.state_dict()
    assert set(back) == set(hf_state) - {"vision_model.embeddings.position_ids"}
    assert all(torch.equal(back[k], hf_state[k]) for k in back)


def test_load_rejects_bad_checkpoints(hf_pair, tmp_path):
    _, _, state = hf_pair
    full = {"visual." + k: v.contiguous() for k, v in state.items()}
    cases = {
        "textual_only": ({"textual.x": torch.zeros(2)}, "no 'visual.\\*' keys"),
        "missing": ({k: v for k, v in full.items() if k != "visual.transformer.2.mlp.2.bias"},
                    "missing key.*visual.transformer.2.mlp.2.bias"),
        "unexpected": ({**full, "visual.proj": torch.zeros(2)}, "unexpected key.*visual.proj"),
        "shape": ({**full, "visual.pre_norm.bias": torch.zeros(3)}, r"visual.pre_norm.bias has shape \[3\]"),
    }  # fmt: skip
    for name, (bad, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, path)
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_clip_vision(path)
        assert str(path) in str(err.value)


def test_missing_file_names_file_and_task(tmp_path):
    missing = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    with pytest.raises(WanrtError, match=rf"image encoder \(CLIP ViT-H/14\) file {missing} not found; the wan2.1 i2v task needs it"):
        load_clip_vision(missing, task="wan2.1 i2v")
