"""diffusers' own Wan LoRA loading (`WanPipeline.load_lora_weights` + `fuse_lora`, PEFT backend) agrees with our merge.

A tiny `WanTransformer3DModel` is written to disk under official names; the same LoRA file is
fused by diffusers and merged by `apply_loras`; every parameter must agree after mapping the
diffusers names to official ones.  Forms: LightX2V/Kijai (`diffusion_model.`, alpha, `diff_b`,
`head.head.diff`), musubi (`lora_unet_`, alpha), and diffusers-native PEFT (`transformer.`, lora_A/B).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wanrt.export.checkpoint.keys import diffusers_to_official
from wanrt.export.checkpoint.view import CheckpointView, open_source
from wanrt.export.lora import LoraSpec, apply_loras

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers' LoRA loading needs the PEFT backend")

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
RANK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**CONFIG)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    official = {diffusers_to_official(k): v for k, v in sd.items()}
    assert None not in official
    path = tmp_path_factory.mktemp("dif") / "base.safetensors"
    save_file(official, str(path))
    return sd, official, path


def lora_state_dict(form: str, official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for n in range(CONFIG["num_layers"]):
        for i, m in enumerate(LINEARS):
            out_f, in_f = official[f"blocks.{n}.{m}.weight"].shape
            up, down = torch.randn(out_f, RANK, generator=g) * 0.1, torch.randn(RANK, in_f, generator=g) * 0.1
            if form == "lightx2v":
                k = f"diffusion_model.blocks.{n}.{m}"
                sd[f"{k}.lora_up.weight"], sd[f"{k}.lora_down.weight"] = up, down
                sd[f"{k}.alpha"] = torch.tensor(float(1 + i % 3))
                sd[f"{k}.diff_b"] = torch.randn(out_f, generator=g) * 0.1
            elif form == "musubi":
                k = "lora_unet_" + f"blocks.{n}.{m}".replace(".", "_")
                sd[f"{k}.lora_up.weight"], sd[f"{k}.lora_down.weight"] = up, down
                sd[f"{k}.alpha"] = torch.tensor(float(2 + i % 4))
            else:  # diffusers-native PEFT keys
                name = {"self_attn": "attn1", "cross_attn": "attn2"}
                part, _, leaf = m.partition(".")
                module = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "0": "net.0.proj", "2": "net.2"}[leaf]
                k = f"transformer.blocks.{n}.{name.get(part, part)}.{module}"
                sd[f"{k}.lora_B.weight"], sd[f"{k}.lora_A.weight"] = up, down
    if form == "lightx2v":  # Wan2.2-Distill: head.head as a full diff plus its bias diff
        sd["diffusion_model.head.head.diff"] = torch.randn(official["head.head.weight"].shape, generator=g) * 0.1
        sd["diffusion_model.head.head.diff_b"] = torch.randn(official["head.head.bias"].shape, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("form", ["lightx2v", "musubi", "peft"])
def test_diffusers_fuse_lora_agrees_with_apply_loras(form, tiny, tmp_path):
    sd, official, base_path = tiny
    lora_path = tmp_path / f"{form}.safetensors"
    save_file(lora_state_dict(form, official), str(lora_path))
    strength = 0.7

    model = diffusers.WanTransformer3DModel(**CONFIG)
    model.load_state_dict(sd)
    pipe = diffusers.WanPipeline(
        transformer=model, vae=None, text_encoder=None, tokenizer=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler()
    )
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    fused = {k: v.detach() for k, v in pipe.transformer.state_dict().items()}

    merged = apply_loras(CheckpointView([open_source(base_path)]), [LoraSpec(lora_path, strength)], "dit")
    assert merged.report.loras[0].skipped == []
    changed = 0
    for dkey, theirs in fused.items():
        ours = merged.load(diffusers_to_official(dkey), torch.float32)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=lambda m: f"{form} {dkey}: {m}")
        changed += not torch.equal(theirs, sd[dkey])
    assert changed == len(merged.patched_keys) > 0
