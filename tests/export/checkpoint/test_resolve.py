"""Resolving a model (`export/checkpoint/resolve.py`): every layout x family/task make-tiny-model writes is recognized
by `inspect --json`, and folders that hold no usable DiT (or several) are one clear error.

Expected values come from the reference facts and from what the test asked for:
- tiny DiT (TEAM.md): head_dim 128, 2 heads (dim 256), ffn 512, 2 layers, text_dim = tiny T5 width;
- in/out channels per task, image branch only in Wan2.1 i2v/flf2v, 257/514 CLIP tokens, Wan2.2
  A14B = two experts using the Wan2.1 VAE, TI2V-5B the Wan2.2 VAE (wan-architecture.md §1, §3);
- file names, dtypes and scale layouts of LightX2V / ComfyUI files (lightx2v-formats.md §1);
- official params per model (wan-architecture.md table) check the parameter-count formula.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.helpers import assert_one_line_error, run_cli
from wanrt.export.models.clip import CLIPVisionConfig
from wanrt.export.models.t5 import T5Config


FAMILY_TASKS = [("wan2.1", "t2v"), ("wan2.1", "i2v"), ("wan2.1", "flf2v"), ("wan2.2", "t2v"), ("wan2.2", "i2v"), ("wan2.2", "ti2v")]
LAYOUTS = ["official", "lightx2v-bf16", "lightx2v-fp8", "lightx2v-int8", "comfyui-fp8", "diffusers"]
CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "flf2v": (36, 16), "ti2v": (48, 48)}
# layout asked for -> (inspect layout, block-linear storage precision, scale layout)
STORAGE = {
    "official": ("official", "fp32", None),
    "diffusers": ("diffusers", "fp32", None),
    "lightx2v-bf16": ("lightx2v", "bf16", None),
    "lightx2v-fp8": ("lightx2v", "fp8_e4m3", "per_channel"),
    "lightx2v-int8": ("lightx2v", "int8", "per_channel"),
    "comfyui-fp8": ("comfyui", "fp8_e4m3", "per_tensor"),
}
DIM, FFN, LAYERS, HEADS, FREQ = 256, 512, 2, 2, 256
SHARD_RE = re.compile(r"^diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors$")


def wan_param_count(dim, ffn, layers, in_dim, out_dim, text_dim=4096, freq_dim=256, clip_dim=None, flf=False) -> int:
    """Parameters of an official WanModel, from the key/shape list of wan-architecture.md §1."""
    d, p = dim, 4
    top = d * in_dim * p + d  # patch_embedding
    top += d * text_dim + d + d * d + d  # text_embedding.0 / .2
    top += d * freq_dim + d + d * d + d  # time_embedding.0 / .2
    top += 6 * d * d + 6 * d  # time_projection.1
    top += 2 * d + p * out_dim * d + p * out_dim  # head.modulation, head.head
    block = 8 * (d * d + d) + 4 * d + 2 * d + (ffn * d + ffn) + (d * ffn + d) + 6 * d
    if clip_dim:
        block += 2 * (d * d + d) + d  # k_img, v_img, norm_k_img
        c = clip_dim
        top += 2 * c + (c * c + c) + (d * c + d) + 2 * d  # img_emb.proj.0/1/3/4
        if flf:
            top += 514 * c  # img_emb.emb_pos
    return top + layers * block


@pytest.mark.parametrize(
    "args, billions",
    [
        ((1536, 8960, 30, 16, 16), 1.419),  # Wan2.1 T2V-1.3B
        ((5120, 13824, 40, 16, 16), 14.288),  # Wan2.1 T2V-14B / Wan2.2 T2V-A14B expert
        ((5120, 13824, 40, 36, 16), 14.289),  # Wan2.2 I2V-A14B expert (no CLIP branch)
        ((3072, 14336, 30, 48, 48), 5.000),  # Wan2.2 TI2V-5B
    ],
)
def test_param_formula_matches_published_counts(args, billions):
    assert round(wan_param_count(*args) / 1e9, 3) == billions


def test_param_formula_matches_published_counts_with_clip():
    assert round(wan_param_count(5120, 13824, 40, 36, 16, clip_dim=1280) / 1e9, 3) == 16.395  # I2V-14B
    assert round(wan_param_count(5120, 13824, 40, 36, 16, clip_dim=1280, flf=True) / 1e9, 3) == 16.396  # FLF2V


def lightx2v_name_re(family: str, task: str, layout: str, expert: str) -> re.Pattern:
    """lightx2v-formats.md: wan2.1_{i2v_480p|i2v_720p|t2v_14b}_[scaled_fp8_e4m3_|int8_]lightx2v_4step[_comfyui]
    and wan2.2_i2v_A14b_{high|low}_noise_...; flf2v / ti2v / wan2.2 t2v follow the same pattern."""
    quant = {"lightx2v-bf16": "", "lightx2v-fp8": "scaled_fp8_e4m3_", "lightx2v-int8": "int8_", "comfyui-fp8": "scaled_fp8_e4m3_"}[layout]
    tail = "_comfyui" if layout == "comfyui-fp8" else ""
    if family == "wan2.1":
        stem = {"t2v": "t2v_14b", "i2v": "i2v_(480|720)p", "flf2v": "flf2v_\\w+"}[task]
        stem = "wan2\\.1_" + stem
    elif expert == "dit":
        stem = f"wan2\\.2_{task}_\\w+"
    else:
        stem = f"wan2\\.2_{task}_A14b_{expert}"
    return re.compile(f"^{stem}_{quant}lightx2v_4step{tail}\\.safetensors$")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_inspect_recognizes_layout(tiny_model, family, task, layout):
    root = tiny_model(family, task, layout)
    r = run_cli("inspect", root, "--json")
    assert r.exit_code == 0, r.stderr
    got = r.json()

    assert (got["family"], got["task"]) == (family, task)
    moe = family == "wan2.2" and task != "ti2v"
    want_layout, want_precision, want_scale = STORAGE[layout]
    assert [e["name"] for e in got["experts"]] == (["high_noise", "low_noise"] if moe else ["dit"])

    in_dim, out_dim = CHANNELS[task]
    image = family == "wan2.1" and task in ("i2v", "flf2v")
    text_dim, clip_dim = T5Config.tiny().dim, CLIPVisionConfig.tiny().width
    want_dit = {"dim": DIM, "ffn_dim": FFN, "num_heads": HEADS, "num_layers": LAYERS, "in_dim": in_dim,
                "out_dim": out_dim, "text_dim": text_dim, "freq_dim": FREQ, "image_branch": image}
    assert {k: got["dit"][k] for k in want_dit} == want_dit
    assert got["dit"]["clip_tokens"] == ({"i2v": 257, "flf2v": 514}[task] if image else None)

    n_params = wan_param_count(DIM, FFN, LAYERS, in_dim, out_dim, text_dim, FREQ, clip_dim if image else None, task == "flf2v")
    for e in got["experts"]:
        assert (e["layout"], e["precision"], e["scale"]) == (want_layout, want_precision, want_scale)
        assert e["num_params"] == n_params
        assert e["unknown_keys"] == []
        names = [f.split("/")[-1] for f in e["files"]]
        folders = {f.split("/")[-2] for f in e["files"]}
        if layout == "diffusers":
            assert folders == {{"dit": "transformer", "high_noise": "transformer", "low_noise": "transformer_2"}[e["name"]]}
        elif moe:
            assert folders == {f"{e['name']}_model"}
        if layout in ("official", "diffusers"):
            shards = [SHARD_RE.match(n) for n in names]
            assert all(shards) and len(names) == int(shards[0].group(2)) > 1, names
            assert (root / e["files"][0]).parent.joinpath("diffusion_pytorch_model.safetensors.index.json").is_file()
        else:
            assert len(names) == 1 and lightx2v_name_re(family, task, layout, e["name"]).match(names[0]), names

    vae_version = "2.2" if task == "ti2v" else "2.1"  # A14B uses the Wan2.1 VAE; only TI2V-5B the Wan2.2 VAE
    assert got["vae_version"] == vae_version
    if layout == "diffusers":  # the pipeline's component folders (transformers / diffusers names)
        assert got["text_encoder"].endswith("/text_encoder/model.safetensors")
        assert got["image_encoder"] == (str(root / "image_encoder" / "model.safetensors") if image else None)
        assert got["vae"].endswith("/vae/diffusion_pytorch_model.safetensors")
        assert got["tokenizer"].endswith("/tokenizer")
        return
    assert got["text_encoder"].endswith("/models_t5_umt5-xxl-enc-bf16.pth")
    if image:
        assert got["image_encoder"].endswith("/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    else:
        assert got["image_encoder"] is None
    assert got["vae"].endswith(f"/Wan{vae_version}_VAE.pth")
    assert got["tokenizer"].endswith("/google/umt5-xxl")


def test_unknown_keys_are_reported(tiny_model, tmp_path):
    """Tensors no Wan variant has (a stray module, a stray block key) are listed, not used, and do not change the model."""
    src = next(tiny_model("wan2.1", "t2v", "lightx2v-bf16").glob("*.safetensors"))
    state = load_file(src)
    extra = {"stray_adapter.proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "blocks.0.foo": torch.zeros(3, dtype=torch.bfloat16)}
    path = tmp_path / src.name
    save_file({**state, **extra}, path)
    want = run_cli("inspect", src, "--json").json()
    r = run_cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    got = r.json()
    assert sorted(got["experts"][0]["unknown_keys"]) == sorted(extra)
    assert got["experts"][0]["num_tensors"] == len(state)
    assert (got["dit"], got["family"], got["task"]) == (want["dit"], want["family"], want["task"])
    assert got["experts"][0]["num_params"] == want["experts"][0]["num_params"]
    notes = [ln.strip() for ln in run_cli("inspect", path).stdout.splitlines() if ln.strip().startswith("note:") and "unknown" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: dit: 2 unknown tensor(s)"), notes
    assert all(k in notes[0] for k in extra)
    assert run_cli("inspect", src, "--json").json()["experts"][0]["unknown_keys"] == []


def test_duplicate_keys_across_shards(official_copy):
    s1, s2 = sorted(official_copy.glob("diffusion_pytorch_model-*.safetensors"))
    first = load_file(s1)
    key = next(iter(first))
    second = load_file(s2)
    second[key] = first[key]
    save_file(second, s2)
    assert_one_line_error(["inspect", official_copy], "duplicate tensor", key, s1.name, s2.name)


@pytest.mark.parametrize("layout, dtype, name", [
    ("lightx2v-fp8", torch.float8_e5m2, "fp8_e5m2"),  # scaled e5m2: not a LightX2V / ComfyUI storage format
    ("lightx2v-bf16", torch.float64, "fp64"),
])
def test_unsupported_block_linear_storage_dtype(tiny_model, tmp_path, layout, dtype, name):
    """Block linears are fp32/fp16/bf16/fp8_e4m3/int8 (issue 2's precision list); anything else is refused by key."""
    src = next(tiny_model("wan2.1", "t2v", layout).glob("*.safetensors"))
    state = load_file(src)
    key = "blocks.1.ffn.2.weight"
    state[key] = state[key].to(torch.float32).to(dtype)
    p = tmp_path / src.name
    save_file(state, p)
    assert_one_line_error(["inspect", p], p, repr(key), name, "unsupported storage dtype", "fp8_e4m3")
    assert_one_line_error(["convert", p, "-o", tmp_path / "out.safetensors", "--quantize", "bf16"], p, repr(key), name)
    assert sorted(x.name for x in tmp_path.iterdir()) == [src.name]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(["inspect", tmp_path / "empty"], tmp_path / "empty", "empty folder")


def test_several_candidate_files(tiny_model, tmp_path):
    for layout in ("lightx2v-bf16", "lightx2v-fp8"):
        f = next(tiny_model("wan2.1", "i2v", layout).glob("*.safetensors"))
        shutil.copy(f, tmp_path / f.name)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert_one_line_error(["inspect", tmp_path], "several candidate", *names, "dit_original_ckpt")


def test_safetensors_and_pth_dit_candidates(tiny_model, tmp_path):
    """A DiT .safetensors beside a DiT .pt (LightX2V distill_model.pt) is a choice for the user, not a silent pick."""
    src = tiny_model("wan2.1", "t2v", "lightx2v-bf16")
    st = next(src.glob("*.safetensors"))
    shutil.copy(st, tmp_path / st.name)
    torch.save({"state_dict": load_file(st)}, tmp_path / "distill_model.pt")
    for companion in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copy(src / companion, tmp_path / companion)
    line = assert_one_line_error(["inspect", tmp_path], "several candidate", "distill_model.pt", st.name, "dit_original_ckpt")
    assert ".pth" not in line  # the T5 / VAE companions are not DiT candidates
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dit_original_ckpt": str(tmp_path / "distill_model.pt")}))
    r = run_cli("inspect", tmp_path, "--config", cfg, "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["experts"][0]["files"] == [str(tmp_path / "distill_model.pt")]
    assert r.json()["text_encoder"] == str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")


def _lora(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(256, 4, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 256, generator=g),
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(256, generator=g),
    }, path)
    return path


def test_lora_passed_as_the_model(tmp_path):
    p = _lora(tmp_path / "wan2.1_t2v_lora_rank4.safetensors")
    assert_one_line_error(["inspect", p], p, "is a LoRA", "--lora")
    assert_one_line_error(["inspect", tmp_path], p, "is a LoRA")
