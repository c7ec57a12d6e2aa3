"""Companion name maps and VAE layout detection (`export/checkpoint/companion_keys.py`).

The oracle tests (transformers / diffusers computing on the mapped weights) live beside the
modules they load: tests/export/models/test_t5.py, test_clip.py, test_vae.py.  Here: the VAE
detection is one rule for `inspect` and the loader, and the maps refuse what they do not know.
Facts: wan-architecture.md §3 (Wan2.1 VAE z 16 on RGB, Wan2.2 VAE z 48 on 2x2-patchified RGB).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.companion_keys import (
    T5_NAMES,
    official_clip_to_hf,
    official_t5_key_to_hf,
    official_to_diffusers_vae_key,
)
from wanrt.export.checkpoint.companions import vae_layout
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.models.vae import VAEConfig, load_vae


@pytest.mark.parametrize("layout, vae_file", [("official", "Wan2.1_VAE.pth"), ("diffusers", "vae/diffusion_pytorch_model.safetensors")])
def test_vae_detection_is_one_rule_for_inspect_and_the_loader(tiny_model, tmp_path, layout, vae_file):
    """A 16-latent-channel VAE fed 12 input channels is neither Wan VAE: both paths say so in the same words."""
    root = tmp_path / "m"
    shutil.copytree(tiny_model("wan2.1", "t2v", layout), root)
    path = root / vae_file
    conv_in = "encoder.conv1.weight" if layout == "official" else "encoder.conv_in.weight"
    state = torch.load(path, weights_only=True) if path.suffix == ".pth" else load_file(path)
    w = state[conv_in]
    state[conv_in] = torch.zeros(w.shape[0], 12, *w.shape[2:], dtype=w.dtype)
    torch.save(state, path) if path.suffix == ".pth" else save_file(state, path)
    with pytest.raises(CheckpointError) as from_inspect:
        resolve_model(root)
    with pytest.raises(CheckpointError) as from_loader:
        load_vae(path)
    assert str(from_inspect.value) == str(from_loader.value)
    assert f"{path}: " in str(from_loader.value) and "z_dim 16 and 12 input channels" in str(from_loader.value)


def test_vae_layout_names_version_and_form(tiny_model):
    official = tiny_model("wan2.2", "ti2v", "official") / "Wan2.2_VAE.pth"
    shapes = {k: tuple(v.shape) for k, v in torch.load(official, weights_only=True).items()}
    found = vae_layout(shapes, official)
    assert (found.version, found.layout, found.z_dim) == ("2.2", "official", 48)
    assert vae_layout({"blocks.0.weight": (1,)}, "x") is None


def test_an_unknown_diffusers_vae_key_is_named(tiny_model, tmp_path):
    path = tmp_path / "vae.safetensors"
    state = load_file(tiny_model("wan2.1", "t2v", "diffusers") / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: unexpected key 'decoder\.extra\.weight' for a diffusers AutoencoderKLWan \(Wan2\.1\)"):
        load_vae(path)


def test_maps_refuse_keys_they_do_not_know():
    with pytest.raises(CheckpointError, match="official T5 key 'blocks.0.attn.q.bias' has no transformers UMT5 name"):
        official_t5_key_to_hf("blocks.0.attn.q.bias")
    assert T5_NAMES.to_official("encoder.block.0.layer.0.SelfAttention.q.bias") is None
    with pytest.raises(CheckpointError, match="official CLIP key visual.'proj' has no transformers name"):
        official_clip_to_hf("proj", torch.zeros(1))
    with pytest.raises(CheckpointError, match="official Wan2.1 VAE key 'decoder.extra.weight' has no diffusers"):
        official_to_diffusers_vae_key("decoder.extra.weight", VAEConfig.tiny("2.1"))
