"""WanVaceDiT (Wan2.1-VACE) against diffusers' WanVACETransformer3DModel beyond the shared DiT cases.

The shared cases (`dit_cases.CASES["vace"]`, run by test_wan_dit.py and tests/export/onnx/test_dit.py)
compare outputs in fp32, bf16 and ONNX; these check what only VACE has: the I/O contract, the
released models' sizes, that the hint scale is per block and that scale 0 is the base T2V model,
and LoRAs on the VACE blocks' linears.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import save_file

from wanrt.engines.model import DiTConfig
from wanrt.export.checkpoint.keys import official_to_diffusers
from wanrt.export.lora import LoraSpec, apply_loras
from wanrt.export.models.wan_dit import DiTError, WanDiT, dit_module, load_dit
from tests.export.models.dit_cases import (
    CASES,
    diffusers_for,
    diffusers_forward,
    diffusers_model,
    make_inputs,
    official_state,
    rel_err,
    write_official,
)

CASE = CASES["vace"]
GRID = (3, 6, 10)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = diffusers_model(CASE, seed=21)
    return model, write_official(official_state(model), tmp_path_factory.mktemp("vace") / "dit.safetensors")


def test_signature_is_the_vace_contract():
    """engines.signatures: vace_context [batch, 96, frames, height, width] and context_scale [batch, vace blocks]."""
    sig = dit_module(CASE.cfg).signature
    assert [(s.name, s.dtype, s.shape) for s in sig.inputs] == [
        ("latent", "float32", ("batch", 16, "frames", "height", "width")),
        ("timestep", "float32", ("batch",)),
        ("context", "float32", ("batch", 512, CASE.cfg.text_dim)),
        ("vace_context", "float32", ("batch", 96, "frames", "height", "width")),
        ("context_scale", "float32", ("batch", 2)),
    ]
    assert [(s.name, s.shape) for s in sig.outputs] == [("noise_pred", ("batch", 16, "frames", "height", "width"))]


# The released VACE models (diffusers' convert_wan_to_diffusers.py configs): dim, ffn, layers, vace_layers.
RELEASED = {"VACE-1.3B": (1536, 8960, 30, list(range(0, 30, 2))), "VACE-14B": (5120, 13824, 40, list(range(0, 40, 5)))}


@pytest.mark.parametrize("name", RELEASED)
def test_released_sizes_have_diffusers_parameter_count(name):
    dim, ffn, layers, vace_layers = RELEASED[name]
    cfg = DiTConfig(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=layers, in_dim=16, out_dim=16,
                    vace_layers=tuple(vace_layers), vace_in_dim=96)
    with torch.device("meta"):
        ours = dit_module(cfg)
        theirs = WanVACETransformer3DModel(num_attention_heads=dim // 128, ffn_dim=ffn, num_layers=layers,
                                           vace_layers=vace_layers, vace_in_channels=96)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_scale_zero_is_the_base_model_and_each_block_has_its_scale(reference):
    model, view = reference
    ours = load_dit(view, CASE.cfg)
    inputs = make_inputs(CASE, batch=1, grid=GRID, seed=22)
    base_cfg = replace(CASE.cfg, vace_layers=(), vace_in_dim=None)
    base_state = {k: v for k, v in official_state(model).items() if not k.startswith("vace_")}
    base = WanTransformer3DModel(**{k: v for k, v in diffusers_for(base_cfg).config.items() if not k.startswith("_")})
    base.load_state_dict({official_to_diffusers(k): v for k, v in base_state.items()}, strict=True)
    with torch.no_grad():
        off = ours(*{**inputs, "context_scale": torch.zeros(1, 2)}.values())
        want_off = base.eval()(inputs["latent"], inputs["timestep"], inputs["context"], return_dict=False)[0]
        assert rel_err(off, want_off) < 1e-4  # no hint: the T2V model under the VACE branch
        outs = [ours(*{**inputs, "context_scale": torch.tensor([s])}.values()) for s in ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])]
    assert rel_err(outs[0], off) > 1e-3 and rel_err(outs[1], off) > 1e-3  # each block's hint counts
    for got, scale in zip(outs, ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])):  # and equals diffusers' per-block scale
        ref = diffusers_forward(model, CASE, {**inputs, "context_scale": torch.tensor([scale])})
        assert rel_err(got, ref) < 1e-4


def test_batch_items_take_their_own_scale(reference):
    _, view = reference
    ours = load_dit(view, CASE.cfg)
    inputs = make_inputs(CASE, batch=2, grid=GRID, seed=23)
    inputs["context_scale"] = torch.tensor([[1.0, 1.0], [0.5, 0.25]])
    with torch.no_grad():
        both = ours(*inputs.values())
        second = ours(*{k: v[1:] for k, v in inputs.items()}.values())
    assert rel_err(both[1:], second) < 1e-5


def test_vace_needs_its_module_and_one_timestep():
    with pytest.raises(DiTError, match="needs the VACE module"):
        WanDiT(CASE.cfg)
    with pytest.raises(DiTError, match="one timestep per sample"):
        dit_module(CASE.cfg, per_frame_timestep=True)


@pytest.mark.parametrize("lora_key,official", [
    ("diffusion_model.vace_blocks.1.self_attn.q", "vace_blocks.1.self_attn.q.weight"),  # LightX2V / Kijai form
    ("transformer.vace_blocks.0.proj_out", "vace_blocks.0.after_proj.weight"),  # diffusers / PEFT form
])
def test_lora_on_vace_block_linears(reference, tmp_path, lora_key, official):
    model, view = reference
    g = torch.Generator().manual_seed(24)
    down, up = torch.randn(4, 256, generator=g), torch.randn(256, 4, generator=g) * 0.05
    peft = lora_key.startswith("transformer.")
    names = (".lora_A.weight", ".lora_B.weight") if peft else (".lora_down.weight", ".lora_up.weight")
    save_file({lora_key + names[0]: down, lora_key + names[1]: up}, str(tmp_path / "lora.safetensors"))
    merged = apply_loras(view, [LoraSpec(tmp_path / "lora.safetensors", strength=0.7)], "dit", strict=True)
    state = official_state(model)
    state[official] = state[official] + 0.7 * up @ down  # no alpha: scale 1
    reference_merged = diffusers_for(CASE.cfg)
    reference_merged.load_state_dict({official_to_diffusers(k): v for k, v in state.items()}, strict=True)
    inputs = make_inputs(CASE, batch=1, grid=GRID, seed=25)
    with torch.no_grad():
        got = load_dit(merged, CASE.cfg)(*inputs.values())
        before = load_dit(view, CASE.cfg)(*inputs.values())
    want = diffusers_forward(reference_merged, CASE, inputs)
    assert rel_err(got, want) < 1e-4
    assert rel_err(before, want) > 1e-4
