"""Companion files typed from their keys (wan-architecture.md §3-4), the tokenizer, sharded diffusers companions."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from wanrt.engines.errors import WanrtError
from wanrt.export.checkpoint.pth import read_pth_header
from wanrt.export.checkpoint.resolve import resolve_model



def test_vae_version_from_keys_not_name(tiny_model, tmp_path):
    root = tmp_path / "ti2v"
    shutil.copytree(tiny_model("wan2.2", "ti2v", "lightx2v-bf16"), root)
    (root / "Wan2.2_VAE.pth").rename(root / "my_vae.pth")
    (root / "models_t5_umt5-xxl-enc-bf16.pth").rename(root / "text_encoder.pth")
    m = resolve_model(root)
    assert (m.vae, m.vae_version, m.text_encoder) == (root / "my_vae.pth", "2.2", root / "text_encoder.pth")


def test_vae_chosen_by_latent_channels(tiny_model, tmp_path):
    root = tmp_path / "a14b"
    shutil.copytree(tiny_model("wan2.2", "t2v", "official"), root)
    shutil.copy(tiny_model("wan2.2", "ti2v", "official") / "Wan2.2_VAE.pth", root / "Wan2.2_VAE.pth")
    m = resolve_model(root)  # A14B outputs 16 latent channels: the Wan2.1 VAE
    assert (m.vae.name, m.vae_version) == ("Wan2.1_VAE.pth", "2.1")
    (root / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(WanrtError, match="Wan2.2 VAE has z_dim 48 but the DiT outputs 16"):
        resolve_model(root)


def test_t5_width_must_match_text_dim(tiny_model, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny_model("wan2.1", "t2v", "official"), root)
    t5 = root / "models_t5_umt5-xxl-enc-bf16.pth"
    state = torch.load(t5, weights_only=True)
    state["token_embedding.weight"] = torch.zeros(state["token_embedding.weight"].shape[0], 32, dtype=torch.bfloat16)
    torch.save(state, t5)
    with pytest.raises(WanrtError, match="T5 width 32 does not match the DiT's text_dim 64"):
        resolve_model(root)


def test_companion_dtypes_and_keys(tiny_model):
    root = tiny_model("wan2.1", "flf2v", "official")
    t5 = read_pth_header(root / "models_t5_umt5-xxl-enc-bf16.pth")
    clip = read_pth_header(root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    vae = read_pth_header(root / "Wan2.1_VAE.pth")
    assert {i.dtype for i in t5.values()} == {"bf16"} and {i.dtype for i in clip.values()} == {"fp16"}
    assert {i.dtype for i in vae.values()} == {"fp32"}
    assert all(k.startswith("visual.") or k == "log_scale" for k in clip)
    assert clip["visual.pos_embedding"].shape[1] == 257  # 224 px, patch 14, plus CLS
    assert len(vae) == 194  # the official Wan2.1 VAE key count (wan-architecture.md §3)
    assert vae["conv2.weight"].shape[:2] == (16, 16)


def test_tokenizer_loads_in_transformers(tiny_model):
    from transformers import AutoTokenizer

    root = tiny_model("wan2.1", "t2v", "official")
    tok = AutoTokenizer.from_pretrained(root / "google" / "umt5-xxl")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(["a red fox running through fresh snow"], padding="max_length", max_length=16, truncation=True)
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    n = sum(mask)
    assert ids[n - 1] == 1 and all(i == 0 for i in ids[n:]) and 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red fox running through fresh snow"
    rows = read_pth_header(root / "models_t5_umt5-xxl-enc-bf16.pth")["token_embedding.weight"].shape[0]
    assert len(tok) <= rows  # every token id has an embedding row


def test_diffusers_companion_folders_are_found(tiny_model, tmp_path):
    root = tiny_model("wan2.1", "i2v", "diffusers")
    m = resolve_model(root)
    assert m.text_encoder == root / "text_encoder" / "model.safetensors"
    assert m.image_encoder == root / "image_encoder" / "model.safetensors"
    assert (m.vae, m.vae_version) == (root / "vae" / "diffusion_pytorch_model.safetensors", "2.1")
    assert m.tokenizer == root / "tokenizer" and m.notes == []


def test_diffusers_tokenizer_without_tokenizer_json_is_an_error(tiny_model, tmp_path):
    root = tmp_path / "diffusers"
    shutil.copytree(tiny_model("wan2.1", "t2v", "diffusers"), root)
    (root / "tokenizer" / "tokenizer.json").unlink()
    (root / "tokenizer" / "spiece.model").write_bytes(b"sentencepiece")
    with pytest.raises(WanrtError, match=f"{root / 'tokenizer'}: holds spiece.model but no tokenizer.json"):
        resolve_model(root)


@pytest.mark.parametrize("family, task", [("wan2.1", "i2v"), ("wan2.2", "ti2v")])
def test_diffusers_companions_load_the_official_tensors(tiny_model, family, task):
    """Both layouts of one seed, read through the exporters' loaders, hold the same tensors (official dtype)."""
    from wanrt.export.models.clip import open_clip_checkpoint
    from wanrt.export.models.t5 import open_t5_checkpoint
    from wanrt.export.models.vae import read_vae_checkpoint

    official, diffusers = resolve_model(tiny_model(family, task)), resolve_model(tiny_model(family, task, "diffusers"))
    (t5_cfg, t5_a), (t5_cfg_b, t5_b) = open_t5_checkpoint(official.text_encoder), open_t5_checkpoint(diffusers.text_encoder)
    assert t5_cfg == t5_cfg_b and sorted(t5_a.keys()) == sorted(t5_b.keys())
    assert all(torch.equal(t5_a.read(k), t5_b.read(k).to(torch.bfloat16)) for k in t5_a.keys())
    vae_cfg, names_a, vae_a = read_vae_checkpoint(official.vae)
    vae_cfg_b, names_b, vae_b = read_vae_checkpoint(diffusers.vae)
    assert vae_cfg == vae_cfg_b and set(names_a) == set(names_b)
    assert all(torch.equal(vae_a.read(names_a[k]), vae_b.read(names_b[k])) for k in names_a)
    if official.image_encoder is None:
        assert diffusers.image_encoder is None
        return
    clip_cfg, clip_a, keys_a = open_clip_checkpoint(official.image_encoder)
    clip_cfg_b, clip_b, keys_b = open_clip_checkpoint(diffusers.image_encoder)
    assert clip_cfg == clip_cfg_b and set(keys_a) == set(keys_b)
    assert all(torch.equal(clip_a.read(keys_a[k]), clip_b.read(keys_b[k]).to(torch.float16)) for k in keys_a)

def test_sharded_diffusers_text_encoder_is_read_through_its_index(tiny_model, tmp_path):
    """A transformers text_encoder/ in shards + model.safetensors.index.json (as the released umt5-xxl) reads as one."""
    from safetensors.torch import load_file, save_file

    from wanrt.export.build import BuildOptions, plan_components
    from wanrt.export.models.t5 import open_t5_checkpoint

    root = tmp_path / "diffusers"
    shutil.copytree(tiny_model("wan2.1", "t2v", "diffusers"), root)
    folder = root / "text_encoder"
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    names = {key: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, key in enumerate(keys)}
    for shard in sorted(set(names.values())):
        save_file({k: state[k] for k in keys if names[k] == shard}, folder / shard)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": names}))
    m = resolve_model(root)
    assert m.text_encoder == index
    single = open_t5_checkpoint(tiny_model("wan2.1", "t2v", "diffusers") / "text_encoder" / "model.safetensors")[1]
    cfg, sharded = open_t5_checkpoint(index)
    assert sorted(sharded.keys()) == sorted(single.keys())
    assert all(torch.equal(sharded.read(k), single.read(k)) for k in single.keys())
    plan = plan_components(m, BuildOptions(components=("text_encoder",)), [])
    assert plan[0].sources == [index, folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WanrtError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        resolve_model(root)
