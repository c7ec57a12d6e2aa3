"""DiT key forms (`export/checkpoint/keys.py`, `names.py`) against a real diffusers `WanTransformer3DModel`.

Facts: peer-formats.md §1 (diffusers names, the norm2/norm3 swap); compiled-path-facts.md
"Peers read for real" (LightX2V's `-d forward` conversion leaves `blocks.N.modulation` unrenamed).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanrt.engines.model import DiTConfig
from wanrt.export.checkpoint.dit_config import expected_shapes
from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.keys import diffusers_to_official, is_official_key, normalize_keys, official_to_diffusers
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.checkpoint.view import CheckpointView, open_source

DIFFUSERS_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, text_dim=64, freq_dim=256,
                      ffn_dim=512, num_layers=2)


def diffusers_model(task: str):
    from diffusers import WanTransformer3DModel

    extra = {
        "t2v": dict(in_channels=16, out_channels=16),
        "i2v": dict(in_channels=36, out_channels=16, image_dim=160, added_kv_proj_dim=256),
        "flf2v": dict(in_channels=36, out_channels=16, image_dim=160, added_kv_proj_dim=256, pos_embed_seq_len=514),
        "ti2v": dict(in_channels=48, out_channels=48),
    }[task]
    return WanTransformer3DModel(**DIFFUSERS_TINY, **extra)


@pytest.mark.parametrize("task", ["t2v", "i2v", "flf2v", "ti2v"])
def test_real_diffusers_keys_normalize_and_round_trip(task):
    sd = diffusers_model(task).state_dict()
    km = normalize_keys(sd)
    assert km.form == "diffusers" and km.unknown == [] and km.ignored == []
    assert len(km.to_source) == len(sd)  # every parameter has an official name, none collide
    for official, stored in km.to_source.items():
        assert is_official_key(official)
        assert official_to_diffusers(official) == stored
        assert diffusers_to_official(stored) == official
    # the official shapes of the converted model are exactly those of an official WanModel with this config
    image = task in ("i2v", "flf2v")
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=sd["patch_embedding.weight"].shape[1],
                    out_dim=sd["proj_out.weight"].shape[0] // 4, text_dim=64, image_branch=image,
                    clip_tokens={"i2v": 257, "flf2v": 514}.get(task), clip_dim=160)
    assert {o: tuple(sd[s].shape) for o, s in km.to_source.items()} == expected_shapes(cfg)


def test_norm2_norm3_swap_and_special_names():
    # convert_wan_to_diffusers.py: official norm3 (affine cross-attn norm) is diffusers norm2
    assert official_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert diffusers_to_official("blocks.3.norm2.bias") == "blocks.3.norm3.bias"
    assert official_to_diffusers("head.modulation") == "scale_shift_table"
    assert official_to_diffusers("blocks.0.modulation") == "blocks.0.scale_shift_table"
    assert official_to_diffusers("img_emb.emb_pos") == "condition_embedder.image_embedder.pos_embed"
    assert official_to_diffusers("blocks.1.cross_attn.k_img.weight") == "blocks.1.attn2.add_k_proj.weight"
    assert official_to_diffusers("blocks.1.cross_attn.norm_k_img.weight") == "blocks.1.attn2.norm_added_k.weight"
    assert official_to_diffusers("head.head.bias") == "proj_out.bias"


@pytest.mark.parametrize("family, task", [("wan2.1", "flf2v"), ("wan2.2", "t2v")])
def test_diffusers_layout_equals_official_bit_for_bit(tiny_model, family, task):
    official = resolve_model(tiny_model(family, task, "official"))
    diffusers = resolve_model(tiny_model(family, task, "diffusers"))
    assert [e.name for e in official.experts] == [e.name for e in diffusers.experts]
    for eo, ed in zip(official.experts, diffusers.experts):
        assert eo.view.layout == "official" and ed.view.layout == "diffusers"
        assert sorted(eo.view) == sorted(ed.view)
        for key in eo.view:
            a, b = eo.view[key].load(), ed.view[key].load()
            assert a.dtype == b.dtype == torch.float32
            assert torch.equal(a, b), key


def test_diffusers_layout_loads_in_diffusers(tiny_model):
    """diffusers itself loads our transformer/ folder strictly, with the official tensors under its names."""
    from diffusers import WanTransformer3DModel

    root = tiny_model("wan2.1", "flf2v", "diffusers")
    model, info = WanTransformer3DModel.from_pretrained(root / "transformer", output_loading_info=True)
    assert all(not v for v in info.values()), info
    view = resolve_model(tiny_model("wan2.1", "flf2v", "official")).experts[0].view
    sd = model.state_dict()
    for key in view:
        assert torch.equal(sd[official_to_diffusers(key)], view.load(key)), key


@pytest.mark.parametrize("prefix, layout", [("model.diffusion_model.", "comfyui"), ("diffusion_model.", "official"), ("model.", "official")])
def test_prefixed_keys_normalize(tiny_model, tmp_path, prefix, layout):
    root = tiny_model("wan2.1", "t2v", "official")
    tensors = {}
    for f in sorted(root.glob("diffusion_pytorch_model-*.safetensors")):
        tensors.update(load_file(f))
    save_file({prefix + k: v for k, v in tensors.items()}, tmp_path / "wan.safetensors")
    view = CheckpointView([open_source(tmp_path / "wan.safetensors")])
    assert view.keymap.prefix == prefix and view.unknown_keys == []
    assert sorted(view) == sorted(tensors)
    assert all(torch.equal(view.load(k), t) for k, t in tensors.items())
    assert view.layout == layout


def diffusers_state(tiny_model, family="wan2.1", task="t2v") -> tuple[dict[str, torch.Tensor], object]:
    """The tensors of a tiny diffusers-layout transformer/ folder, and the folder."""
    folder = tiny_model(family, task, "diffusers") / "transformer"
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state, folder


def test_diffusers_file_keeping_official_modulation_loads(tiny_model, tmp_path):
    """LightX2V's `-d forward` output: diffusers names, but `blocks.N.modulation` left as the official name."""
    state, _ = diffusers_state(tiny_model)
    forward = {(k.replace("scale_shift_table", "modulation") if k.startswith("blocks.") else k): v for k, v in state.items()}
    assert any(k.endswith(".modulation") for k in forward) and "scale_shift_table" in forward
    save_file(forward, tmp_path / "forward.safetensors")
    view = CheckpointView([open_source(tmp_path / "forward.safetensors")])
    assert view.form == "diffusers" and view.unknown_keys == []
    official = resolve_model(tiny_model("wan2.1", "t2v", "official")).experts[0].view
    assert sorted(view) == sorted(official)
    for key in official:
        assert torch.equal(view.load(key), official.load(key)), key


def test_an_unmapped_key_is_named_as_unknown_not_as_a_missing_tensor(tiny_model, tmp_path):
    state, _ = diffusers_state(tiny_model)
    state["blocks.0.attn1.toq.weight"] = state.pop("blocks.0.attn1.to_q.weight")
    save_file(state, tmp_path / "wan.safetensors")
    with pytest.raises(CheckpointError) as err:
        resolve_model(tmp_path / "wan.safetensors")
    msg = str(err.value)
    assert "missing tensor(s) blocks.0.self_attn.q.weight" in msg
    assert "1 unknown key(s) (blocks.0.attn1.toq.weight) have no official name" in msg


def test_two_stored_keys_for_one_official_tensor_are_an_error(tiny_model, tmp_path):
    state, _ = diffusers_state(tiny_model)
    state["blocks.1.modulation"] = state["blocks.1.scale_shift_table"].clone()
    save_file(state, tmp_path / "both.safetensors")
    with pytest.raises(CheckpointError, match=r"both\.safetensors: '.*' and '.*' both name the official tensor 'blocks\.1\.modulation'"):
        resolve_model(tmp_path / "both.safetensors")
