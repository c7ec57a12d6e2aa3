"""Every LoRA key form merges to the same weights as a plain-torch merge written here.

Key forms from shared/reference/peer-formats.md §1-2 and lightx2v-formats.md §2; the diffusers
module names below are typed from the official->diffusers rename table, not taken from our code.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from wanrt.export.checkpoint.view import CheckpointView, open_source
from wanrt.export.lora import LoraError, LoraSpec, apply_loras

from .conftest import official_state_dict

RANK = 4
# official module -> diffusers module (peer-formats.md, convert_wan_to_diffusers rename table)
LOW_RANK = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.0.cross_attn.k": "blocks.0.attn2.to_k",
    "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
    "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "head.head": "proj_out",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
}
BIAS_DELTAS = ["blocks.0.self_attn.q", "blocks.1.ffn.0"]  # .diff_b (or PEFT lora_B.bias)
WEIGHT_DELTAS = ["blocks.0.norm3", "blocks.1.self_attn.norm_q"]  # .diff on a weight


def factors(base_sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (up [out, r], down [r, in]) per low-rank module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in LOW_RANK:
        o, i = base_sd[m + ".weight"].shape
        out[m] = (torch.randn(o, RANK, generator=g) * 0.1, torch.randn(RANK, i, generator=g) * 0.1)
    return out


def deltas(base_sd: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    """Random full deltas keyed by the official tensor they change."""
    g = torch.Generator().manual_seed(seed)
    d = {f"{m}.bias": torch.randn(base_sd[f"{m}.bias"].shape, generator=g) * 0.1 for m in BIAS_DELTAS}
    d.update({f"{m}.weight": torch.randn(base_sd[f"{m}.weight"].shape, generator=g) * 0.1 for m in WEIGHT_DELTAS})
    d["blocks.1.modulation"] = torch.randn(base_sd["blocks.1.modulation"].shape, generator=g) * 0.1
    d["blocks.0.modulation"] = torch.randn(base_sd["blocks.0.modulation"].shape, generator=g) * 0.1
    return d


def reference_merge(base_sd, low_rank: dict[str, tuple[torch.Tensor, torch.Tensor, float]], full: dict[str, torch.Tensor], strength: float):
    """W + strength * scale * up @ down and W + strength * delta, in float64."""
    out = {k: v.to(torch.float64).clone() for k, v in base_sd.items()}
    for m, (up, down, scale) in low_rank.items():
        w = out[m + ".weight"]
        w += strength * scale * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
    for key, d in full.items():
        out[key] += strength * d.double().reshape(out[key].shape)
    return out


def render(form: str, f, d) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, torch.Tensor]]:
    """A LoRA state dict in `form`, the scale each module should get, and the deltas it carries."""
    sd: dict[str, torch.Tensor] = {}
    scales = {m: 1.0 for m in f}
    carried: dict[str, torch.Tensor] = {}
    if form == "lightx2v":
        for m, (up, down) in f.items():
            sd[f"diffusion_model.{m}.lora_up.weight"] = up
            sd[f"diffusion_model.{m}.lora_down.weight"] = down
        for m in BIAS_DELTAS:
            sd[f"diffusion_model.{m}.diff_b"] = d[f"{m}.bias"]
        for m in WEIGHT_DELTAS:
            sd[f"diffusion_model.{m}.diff"] = d[f"{m}.weight"]
        sd["diffusion_model.blocks.1.diff_m"] = d["blocks.1.modulation"]
        sd["diffusion_model.blocks.0.modulation.diff"] = d["blocks.0.modulation"]  # Kijai's spelling of diff_m
        carried = dict(d)
    elif form in ("peft_transformer", "peft_default_diffusers"):
        prefix, infix = ("transformer.", "") if form == "peft_transformer" else ("base_model.model.", ".default")
        for m, (up, down) in f.items():
            sd[f"{prefix}{LOW_RANK[m]}.lora_B{infix}.weight"] = up
            sd[f"{prefix}{LOW_RANK[m]}.lora_A{infix}.weight"] = down
        for m in BIAS_DELTAS:
            sd[f"{prefix}{LOW_RANK[m]}.lora_B{infix}.bias"] = d[f"{m}.bias"]
            carried[f"{m}.bias"] = d[f"{m}.bias"]
    elif form == "peft_official_names":  # Kijai rsLoRA files: base_model.model. + official names
        for m, (up, down) in f.items():
            sd[f"base_model.model.{m}.lora_B.weight"] = up
            sd[f"base_model.model.{m}.lora_A.weight"] = down
    elif form in ("kohya", "kohya_diffusers_names"):
        for i, (m, (up, down)) in enumerate(f.items()):
            k = "lora_unet_" + (m if form == "kohya" else LOW_RANK[m]).replace(".", "_")
            alpha = float(2 + i)
            sd[f"{k}.lora_up.weight"] = up
            sd[f"{k}.lora_down.weight"] = down
            sd[f"{k}.alpha"] = torch.tensor(alpha)
            scales[m] = alpha / RANK
    elif form in ("comfyui_linear_layer", "comfyui_underscore", "comfyui_dot", "mochi"):
        up_s, down_s = {
            "comfyui_linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
            "comfyui_underscore": ("_lora.up.weight", "_lora.down.weight"),
            "comfyui_dot": (".lora.up.weight", ".lora.down.weight"),
            "mochi": (".lora_B", ".lora_A"),
        }[form]
        for i, (m, (up, down)) in enumerate(f.items()):
            sd[f"model.diffusion_model.{m}{up_s}"] = up
            sd[f"model.diffusion_model.{m}{down_s}"] = down
            if i % 2 == 0:  # alpha on every other layer
                sd[f"model.diffusion_model.{m}.alpha"] = torch.tensor([8.0])
                scales[m] = 8.0 / RANK
        for m in WEIGHT_DELTAS:
            sd[f"model.diffusion_model.{m}.diff"] = d[f"{m}.weight"]
            carried[f"{m}.weight"] = d[f"{m}.weight"]
        for m in BIAS_DELTAS:
            sd[f"model.diffusion_model.{m}.diff_b"] = d[f"{m}.bias"]
            carried[f"{m}.bias"] = d[f"{m}.bias"]
    else:
        raise AssertionError(form)
    return sd, scales, carried


FORMS = [
    "lightx2v",
    "peft_transformer",
    "peft_default_diffusers",
    "peft_official_names",
    "kohya",
    "kohya_diffusers_names",
    "comfyui_linear_layer",
    "comfyui_underscore",
    "comfyui_dot",
    "mochi",
]


@pytest.fixture(scope="module")
def view(base_file):
    return CheckpointView([open_source(base_file)])


@pytest.mark.parametrize("form", FORMS)
def test_key_form_merges_like_plain_torch(form, base_sd, view, write_file, assert_close):
    f, d = factors(base_sd), deltas(base_sd)
    lora, scales, carried = render(form, f, d)
    strength = 0.7
    merged = apply_loras(view, [LoraSpec(write_file(lora), strength)], "dit")
    assert merged.report.loras[0].skipped == []
    ref = reference_merge(base_sd, {m: (*f[m], scales[m]) for m in f}, carried, strength)
    got = merged.state_dict(torch.float32)
    assert set(got) == set(base_sd)
    assert_close(got, ref)
    changed = {k for k in base_sd if not torch.equal(got[k], base_sd[k])}
    assert changed == {m + ".weight" for m in f} | set(carried)


def test_head_diff_alone_and_diff_m(base_sd, view, write_file, assert_close):
    """LightX2V Wan2.2-Distill: `head.head.diff` is a full weight delta with no up/down pair."""
    g = torch.Generator().manual_seed(3)
    dh = torch.randn(base_sd["head.head.weight"].shape, generator=g)
    dm = torch.randn(base_sd["blocks.0.modulation"].shape, generator=g)
    path = write_file({"diffusion_model.head.head.diff": dh, "diffusion_model.blocks.0.diff_m": dm})
    got = apply_loras(view, [LoraSpec(path, 0.5)], "dit")
    assert_close(got.load("head.head.weight"), base_sd["head.head.weight"] + 0.5 * dh)
    assert_close(got.load("blocks.0.modulation"), base_sd["blocks.0.modulation"] + 0.5 * dm)
    assert got.patched_keys == ["blocks.0.modulation", "head.head.weight"]


def test_conv_lora_on_patch_embedding(base_sd, view, write_file, assert_close):
    """A LoRA on the Conv3d patch embedding: up [dim, r] @ down [r, in*kt*kh*kw], reshaped to the kernel."""
    g = torch.Generator().manual_seed(4)
    w = base_sd["patch_embedding.weight"]
    up = torch.randn(w.shape[0], RANK, 1, 1, 1, generator=g)
    down = torch.randn(RANK, *w.shape[1:], generator=g)
    path = write_file({"diffusion_model.patch_embedding.lora_up.weight": up, "diffusion_model.patch_embedding.lora_down.weight": down})
    got = apply_loras(view, [LoraSpec(path)], "dit").load("patch_embedding.weight")
    want = w.double() + (up.double().reshape(w.shape[0], RANK) @ down.double().reshape(RANK, -1)).reshape(w.shape)
    assert_close(got, want)


def test_config_alpha_is_honoured_and_file_alpha_wins(base_sd, view, write_file, assert_close):
    f = factors(base_sd)
    m = "blocks.0.self_attn.q"
    up, down = f[m]
    no_alpha = write_file({f"diffusion_model.{m}.lora_up.weight": up, f"diffusion_model.{m}.lora_down.weight": down}, "a.safetensors")
    with_alpha = write_file(
        {f"diffusion_model.{m}.lora_up.weight": up, f"diffusion_model.{m}.lora_down.weight": down, f"diffusion_model.{m}.alpha": torch.tensor(2.0)},
        "b.safetensors",
    )
    delta = (up @ down).double()
    w = base_sd[m + ".weight"].double()
    got = apply_loras(view, [LoraSpec(no_alpha, 1.0, alpha=16.0)], "dit").load(m + ".weight")
    assert_close(got, w + 16.0 / RANK * delta)
    got = apply_loras(view, [LoraSpec(with_alpha, 1.0, alpha=16.0)], "dit").load(m + ".weight")
    assert_close(got, w + 2.0 / RANK * delta)


def test_several_loras_apply_in_order_with_their_strengths(base_sd, view, write_file, assert_close):
    m = "blocks.1.ffn.0"
    f1, f2 = factors(base_sd, 10)[m], factors(base_sd, 11)[m]
    p1 = write_file({f"diffusion_model.{m}.lora_up.weight": f1[0], f"diffusion_model.{m}.lora_down.weight": f1[1]}, "one.safetensors")
    p2 = write_file({f"transformer.blocks.1.ffn.net.0.proj.lora_B.weight": f2[0], f"transformer.blocks.1.ffn.net.0.proj.lora_A.weight": f2[1]}, "two.safetensors")
    got = apply_loras(view, [LoraSpec(p1, 0.5), LoraSpec(p2, -1.25)], "dit")
    want = base_sd[m + ".weight"].double() + 0.5 * (f1[0] @ f1[1]).double() - 1.25 * (f2[0] @ f2[1]).double()
    assert_close(got.load(m + ".weight"), want)
    assert [r.spec.path.name for r in got.report.loras] == ["one.safetensors", "two.safetensors"]


def test_bf16_base_is_merged_in_fp32_and_cast_back(base_sd_bf16, base_file_bf16, base_sd, write_file, assert_close):
    view = CheckpointView([open_source(base_file_bf16)])
    f = factors(base_sd)
    m = "blocks.0.cross_attn.k"
    up, down = f[m]
    path = write_file({f"diffusion_model.{m}.lora_up.weight": up, f"diffusion_model.{m}.lora_down.weight": down})
    merged = apply_loras(view, [LoraSpec(path, 0.3)], "dit")
    ref = merged[m + ".weight"]
    assert ref.dtype == "bf16"
    stored, scale = ref.load_stored()
    assert stored.dtype == torch.bfloat16 and scale is None
    want = (base_sd_bf16[m + ".weight"].float() + 0.3 * (up @ down)).to(torch.bfloat16)
    # equal up to one bf16 rounding step (fp32 summation order may differ)
    assert_close(stored, want, atol=1e-6, rtol=2**-7)
    # unpatched tensors are the base's own refs, read unchanged
    assert merged["blocks.1.ffn.2.weight"] is view["blocks.1.ffn.2.weight"]
    assert torch.equal(merged.load("blocks.1.ffn.2.weight", torch.bfloat16), base_sd_bf16["blocks.1.ffn.2.weight"])


def test_expert_targeting(base_sd, view, write_file):
    m = "blocks.0.self_attn.q"
    up, down = factors(base_sd)[m]
    path = write_file({f"diffusion_model.{m}.lora_up.weight": up, f"diffusion_model.{m}.lora_down.weight": down})
    high = LoraSpec(path, 1.0, "high_noise")
    assert apply_loras(view, [high], "low_noise").patched_keys == []
    assert apply_loras(view, [high], "high_noise").patched_keys == [m + ".weight"]
    assert apply_loras(view, [LoraSpec(path)], "low_noise").patched_keys == [m + ".weight"]
    with pytest.raises(LoraError, match="single DiT"):
        apply_loras(view, [high], "dit")
    with pytest.raises(LoraError, match="unknown expert 'medium_noise'"):
        apply_loras(view, [LoraSpec(path)], "medium_noise")


def test_keys_the_base_lacks_are_skipped_with_a_counted_warning(base_sd, view, write_file, caplog):
    """An I2V LoRA (k_img / v_img / img_emb) on a T2V base: those keys are skipped, the rest merge."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n in range(2):
        for m in ("self_attn.q", "cross_attn.k_img", "cross_attn.v_img"):
            sd[f"diffusion_model.blocks.{n}.{m}.lora_up.weight"] = torch.randn(256, RANK, generator=g)
            sd[f"diffusion_model.blocks.{n}.{m}.lora_down.weight"] = torch.randn(RANK, 256, generator=g)
        sd[f"diffusion_model.blocks.{n}.cross_attn.norm_k_img.diff"] = torch.randn(256, generator=g)
    sd["diffusion_model.img_emb.proj.1.diff_b"] = torch.randn(256, generator=g)
    path = write_file(sd)
    with caplog.at_level(logging.WARNING, logger="wanrt.lora"):
        merged = apply_loras(view, [LoraSpec(path)], "dit")
    assert merged.patched_keys == ["blocks.0.self_attn.q.weight", "blocks.1.self_attn.q.weight"]
    assert len(merged.report.loras[0].skipped) == 11
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "11 of 15 keys" in msg and "k_img" in msg
    with pytest.raises(LoraError, match="11 of 15 keys.*--lora-strict"):
        apply_loras(view, [LoraSpec(path)], "dit", strict=True)


def test_a_lora_that_matches_nothing_is_an_error(view, write_file):
    g = torch.Generator().manual_seed(6)
    path = write_file(
        {
            "diffusion_model.vace_blocks.0.after_proj.lora_up.weight": torch.randn(8, RANK, generator=g),
            "diffusion_model.vace_blocks.0.after_proj.lora_down.weight": torch.randn(RANK, 8, generator=g),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, RANK, generator=g),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(RANK, 8, generator=g),
        }
    )
    with pytest.raises(LoraError, match="matches none of the base's .* tensors"):
        apply_loras(view, [LoraSpec(path)], "dit")


def test_shape_mismatch_names_key_and_both_shapes(view, write_file):
    path = write_file(
        {
            "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(300, RANK),
            "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, 256),
        }
    )
    with pytest.raises(LoraError, match=r"blocks\.0\.ffn\.0\.weight.*\[300, 4\].*\[4, 256\].*\[512, 256\]"):
        apply_loras(view, [LoraSpec(path)], "dit")
    path = write_file({"diffusion_model.blocks.0.norm3.diff": torch.zeros(255)}, "diff.safetensors")
    with pytest.raises(LoraError, match=r"blocks\.0\.norm3\.diff.*\[255\].*blocks\.0\.norm3\.weight.*\[256\]"):
        apply_loras(view, [LoraSpec(path)], "dit")


def test_a_transposed_full_delta_is_a_shape_mismatch(base_sd, view, write_file):
    """Same element count, other shape: a `.diff` of ffn.0 stored [in, out] must not be reshaped onto [out, in]."""
    w = base_sd["blocks.0.ffn.0.weight"]
    assert w.shape[0] != w.shape[1]
    path = write_file({"diffusion_model.blocks.0.ffn.0.diff": torch.zeros(w.shape[1], w.shape[0])})
    with pytest.raises(LoraError, match=r"'diffusion_model\.blocks\.0\.ffn\.0\.diff' is \[256, 512\].*'blocks\.0\.ffn\.0\.weight' is \[512, 256\]"):
        apply_loras(view, [LoraSpec(path)], "dit")
    m = base_sd["blocks.0.modulation"]  # [1, 6, dim]
    path = write_file({"diffusion_model.blocks.0.diff_m": torch.zeros(m.shape[2], m.shape[1])}, "diff_m.safetensors")
    with pytest.raises(LoraError, match=r"diff_m' is \[256, 6\].*'blocks\.0\.modulation' is \[1, 6, 256\]"):
        apply_loras(view, [LoraSpec(path)], "dit")


def test_diff_m_without_the_leading_unit_dim_fits_the_modulation(base_sd, view, write_file, assert_close):
    """A [6, dim] `diff_m` (size-1 dimension dropped) adds to the [1, 6, dim] block modulation."""
    m = base_sd["blocks.1.modulation"]
    dm = torch.randn(m.shape[1:], generator=torch.Generator().manual_seed(8))
    path = write_file({"diffusion_model.blocks.1.diff_m": dm})
    got = apply_loras(view, [LoraSpec(path, 0.25)], "dit").load("blocks.1.modulation")
    assert got.shape == m.shape
    assert_close(got, m.double() + 0.25 * dm.double().unsqueeze(0))


def test_rank_mismatch_and_unpaired_factors(view, write_file):
    path = write_file(
        {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(256, 4), "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(5, 256)}
    )
    with pytest.raises(LoraError, match=r"rank mismatch.*\[256, 4\].*\[5, 256\]"):
        apply_loras(view, [LoraSpec(path)], "dit")
    path = write_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(256, 4)}, "half.safetensors")
    with pytest.raises(LoraError, match="no matching down"):
        apply_loras(view, [LoraSpec(path)], "dit")


def test_dora_is_refused_clearly(view, write_file):
    path = write_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(256, 4),
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 256),
            "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(256, 1),
        }
    )
    with pytest.raises(LoraError, match="DoRA.*not supported"):
        apply_loras(view, [LoraSpec(path)], "dit")


# I2V base (Wan2.1 i2v/flf2v): official module -> diffusers module, typed from peer-formats.md
# (`attn2.to_k_img -> attn2.add_k_proj`, `img_emb.proj.1 -> condition_embedder.image_embedder.ff.net.0.proj`, ...).
I2V_LOW_RANK = {
    "blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj",
    "blocks.1.cross_attn.v_img": "blocks.1.attn2.add_v_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
I2V_BIAS = ["blocks.0.cross_attn.k_img", "img_emb.proj.1"]  # PEFT lora_B.bias
# official tensor -> diffusers name of its full delta
I2V_DELTAS = {
    "blocks.1.cross_attn.norm_k_img.weight": "blocks.1.attn2.norm_added_k.diff",
    "img_emb.proj.0.bias": "condition_embedder.image_embedder.norm1.diff_b",
    "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.diff",
}


@pytest.fixture(scope="module")
def i2v_sd() -> dict[str, torch.Tensor]:
    return official_state_dict(seed=7, i2v=True)


@pytest.fixture(scope="module")
def i2v_view(tmp_path_factory, i2v_sd) -> CheckpointView:
    path = tmp_path_factory.mktemp("i2v") / "wan_i2v_fp32.safetensors"
    save_file(i2v_sd, str(path))
    return CheckpointView([open_source(path)])


@pytest.mark.parametrize("form", ["peft_transformer", "peft_default", "kohya_diffusers_names"])
def test_diffusers_added_kv_and_image_embedder_on_an_i2v_base(form, i2v_sd, i2v_view, write_file, assert_close):
    """`attn2.add_k_proj`/`add_v_proj` patch `cross_attn.k_img`/`v_img`; `condition_embedder.image_embedder.*` patches `img_emb.proj.*`."""
    g = torch.Generator().manual_seed(12)
    low_rank, full, lora = {}, {}, {}
    prefix, infix = {"peft_transformer": ("transformer.", ""), "peft_default": ("base_model.model.", ".default")}.get(form, ("", ""))
    for i, (m, diffusers) in enumerate(I2V_LOW_RANK.items()):
        o, n = i2v_sd[m + ".weight"].shape
        up, down = torch.randn(o, RANK, generator=g) * 0.1, torch.randn(RANK, n, generator=g) * 0.1
        if form == "kohya_diffusers_names":
            k = "lora_unet_" + diffusers.replace(".", "_")
            lora |= {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(float(i + 1))}
            low_rank[m] = (up, down, (i + 1) / RANK)
            continue
        lora |= {f"{prefix}{diffusers}.lora_B{infix}.weight": up, f"{prefix}{diffusers}.lora_A{infix}.weight": down}
        low_rank[m] = (up, down, 1.0)
        if m in I2V_BIAS:
            full[m + ".bias"] = torch.randn(o, generator=g) * 0.1
            lora[f"{prefix}{diffusers}.lora_B{infix}.bias"] = full[m + ".bias"]
    if form == "peft_transformer":
        for official, key in I2V_DELTAS.items():
            full[official] = torch.randn(i2v_sd[official].shape, generator=g) * 0.1
            lora["transformer." + key] = full[official]
    strength = 0.8
    merged = apply_loras(i2v_view, [LoraSpec(write_file(lora), strength)], "dit")
    assert merged.report.loras[0].skipped == []
    got = merged.state_dict(torch.float32)
    assert_close(got, reference_merge(i2v_sd, low_rank, full, strength))
    changed = {k for k in i2v_sd if not torch.equal(got[k], i2v_sd[k])}
    assert changed == {m + ".weight" for m in I2V_LOW_RANK} | set(full)
