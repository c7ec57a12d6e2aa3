"""WanDiT equals diffusers' WanTransformer3DModel on every Wan DiT variant (tiny random weights).

Each reference is a tiny random diffusers model (`dit_cases`), saved in official layout (keys renamed with
`export.checkpoint.keys.diffusers_to_official`) to a safetensors file, read back through the
checkpoint layer (`CheckpointView`) and loaded with `load_dit`.  head_dim is 128 so the RoPE
split is the official [22, 21, 21] pairs (diffusers splits by head_dim: 44/42/42).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from wanrt.engines.model import DiTConfig
from wanrt.export.checkpoint.keys import official_to_diffusers
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.checkpoint.view import CheckpointView
from wanrt.export.lora import LoraSpec, apply_loras
from wanrt.export.models.wan_dit import DiTError, WanDiT, dit_module, load_dit
from wanrt.export.tiny import make_tiny_model
from tests.export.models.dit_cases import (
    CASES,
    Case,
    diffusers_for,
    diffusers_forward,
    diffusers_model,
    make_inputs,
    official_state,
    rel_err,
    write_official,
)

GRIDS = [(3, 6, 10), (2, 10, 4)]  # latent (frames, height, width): odd token grids 3x3x5, 2x5x2


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[WanTransformer3DModel, CheckpointView]]:
    """Per case: the diffusers model and its official-layout checkpoint view."""
    out = {}
    for i, (name, case) in enumerate(CASES.items()):
        model = diffusers_model(case, seed=10 + i)
        out[name] = (model, write_official(official_state(model), tmp_path_factory.mktemp(name) / "dit.safetensors"))
    return out


@pytest.mark.parametrize("name", CASES)
def test_parameter_names_are_the_official_keys(name, references):
    _, view = references[name]
    ours = {k: tuple(p.shape) for k, p in dit_module(CASES[name].cfg).named_parameters()}
    assert ours == {k: tuple(view[k].shape) for k in view}


# Parameter counts of the released models (reference wan-architecture.md §1 table).
REAL = {
    "2.1 t2v 1.3B": (DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16), 1.419e9),
    "2.1 t2v 14B": (DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16), 14.288e9),
    "2.1 i2v 14B": (DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16,
                              image_branch=True, clip_tokens=257), 16.395e9),
    "2.1 flf2v 14B": (DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16,
                                image_branch=True, clip_tokens=514), 16.396e9),
    "2.2 i2v A14B": (DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16), 14.289e9),
    "2.2 ti2v 5B": (DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48), 5.000e9),
}


@pytest.mark.parametrize("name", REAL)
def test_real_size_parameter_count(name):
    cfg, params = REAL[name]
    with torch.device("meta"):
        model = WanDiT(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, abs=0.0005e9)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", CASES)
def test_fp32_matches_diffusers(name, grid, references):
    case = CASES[name]
    model, view = references[name]
    ours = load_dit(view, case.cfg)
    inputs = make_inputs(case, batch=2, grid=grid, seed=1)
    with torch.no_grad():
        got = ours(*inputs.values())
    want = diffusers_forward(model, case, inputs)
    assert got.dtype == torch.float32 and got.shape == (2, case.cfg.out_dim, *grid)
    assert rel_err(got, want) < 1e-4
    # batch items are independent: item 1 alone gives the same answer
    single = {k: v[1:] for k, v in inputs.items()}
    with torch.no_grad():
        assert rel_err(ours(*single.values()), want[1:]) < 1e-4


@pytest.mark.parametrize("name", CASES)
def test_bf16_matches_diffusers_fp32(name, references):
    case = CASES[name]
    model, view = references[name]
    ours = load_dit(view, case.cfg, dtype=torch.bfloat16)
    assert ours.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert ours.blocks[0].modulation.dtype == ours.time_embedding[0].weight.dtype == torch.float32
    inputs = make_inputs(case, batch=2, grid=GRIDS[0], seed=2)
    with torch.no_grad():
        got = ours(*inputs.values())
    assert got.dtype == torch.float32
    assert rel_err(got, diffusers_forward(model, case, inputs)) < 2e-2


def test_timesteps_matter_per_item_and_per_frame(references):
    """Different timesteps give different outputs (the comparison above is not vacuous)."""
    case = CASES["ti2v"]
    ours = load_dit(references["ti2v"][1], case.cfg)
    inputs = make_inputs(case, batch=1, grid=GRIDS[0], seed=3)
    with torch.no_grad():
        base = ours(*inputs.values())
        inputs["timestep"][0, 2] = 500.0
        moved = ours(*inputs.values())
    changed = (base - moved).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-3  # frame 2's prediction moves with its own timestep


def test_load_dit_infers_the_config(references):
    _, view = references["flf2v"]
    ours = load_dit(view)
    assert ours.cfg.image_branch and ours.cfg.clip_tokens == 514 and ours.cfg.in_dim == 36


def test_load_dit_names_missing_unknown_and_misshaped_keys(references, tmp_path):
    model, _ = references["t2v"]
    state = official_state(model)
    cfg = CASES["t2v"].cfg
    missing = {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}
    with pytest.raises(DiTError, match=r"missing DiT tensor\(s\) blocks\.1\.ffn\.2\.bias"):
        load_dit(write_official(missing, tmp_path / "missing.safetensors"), cfg)
    extra = dict(state, **{"blocks.2.modulation": torch.zeros(1, 6, 256)})
    with pytest.raises(DiTError, match=r"blocks\.2\.modulation.*do not belong"):
        load_dit(write_official(extra, tmp_path / "extra.safetensors"), cfg)
    bad = dict(state, **{"head.head.bias": torch.zeros(63)})
    with pytest.raises(DiTError, match=r"head\.head\.bias has shape \[63\]; expected \[64\]"):
        load_dit(write_official(bad, tmp_path / "bad.safetensors"), cfg)
    with pytest.raises(DiTError, match="attention implementation"):
        WanDiT(cfg, attention_impl="flash")
    no_clip = make_inputs(CASES["i2v"], 1, GRIDS[0], 0)
    del no_clip["clip_fea"]
    with pytest.raises(DiTError, match="needs clip_fea"):
        load_dit(references["i2v"][1], CASES["i2v"].cfg)(*no_clip.values())


def test_other_config_rejected_with_the_key(references):
    _, view = references["t2v"]
    wider = replace(CASES["t2v"].cfg, ffn_dim=1024)
    with pytest.raises(DiTError, match=r"blocks\.0\.ffn\.0\.weight has shape \[512, 256\]; expected \[1024, 256\]"):
        load_dit(view, wider)


def diffusers_from_state(cfg: DiTConfig, state: dict[str, torch.Tensor]) -> WanTransformer3DModel:
    """diffusers' transformer holding official-named weights (keys mapped with official_to_diffusers)."""
    model = diffusers_for(cfg)
    model.load_state_dict({official_to_diffusers(k): v for k, v in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("family,task,layout", [
    ("wan2.2", "t2v", "official"),  # MoE folder: high_noise_model/ + low_noise_model/, sharded fp32
    ("wan2.2", "i2v", "lightx2v-fp8"),  # MoE, fp8 e4m3 with per-channel scales, dequantized by the view
    ("wan2.2", "ti2v", "lightx2v-int8"),  # per-frame timesteps, int8
    ("wan2.1", "flf2v", "diffusers"),  # diffusers folder, image branch with emb_pos
    ("wan2.1", "vace", "comfyui-fp8"),  # VACE blocks' linears scaled fp8 too, under model.diffusion_model.
    ("wan2.1", "vace", "diffusers"),  # WanVACETransformer3DModel folder (proj_in / proj_out)
])
def test_real_folders_each_expert_against_its_own_reference(family, task, layout, tmp_path):
    resolved = resolve_model(make_tiny_model(tmp_path / "model", family, task, layout=layout))
    case = Case(resolved.dit)
    inputs = make_inputs(case, batch=2, grid=GRIDS[1], seed=4)
    outputs = {}
    for expert in resolved.experts:
        ours = load_dit(expert.view)  # config inferred from the expert's shapes
        assert ours.cfg == resolved.dit
        reference = diffusers_from_state(resolved.dit, expert.view.state_dict())
        with torch.no_grad():
            outputs[expert.name] = ours(*inputs.values())
        assert rel_err(outputs[expert.name], diffusers_forward(reference, case, inputs)) < 1e-4
    if len(outputs) == 2:  # two experts, two different models
        assert list(outputs) == ["high_noise", "low_noise"]
        assert rel_err(outputs["high_noise"], outputs["low_noise"]) > 0.1


def test_lora_merged_view_equals_diffusers_with_merged_weights(references, tmp_path):
    """A MergedView (LoRA merged on read) loads like any view; W + strength * up @ down (alpha = rank)."""
    _, view = references["t2v"]
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 256, generator=g), torch.randn(256, 4, generator=g) * 0.05
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_down.weight": down,
               "diffusion_model.blocks.1.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.1.self_attn.q.alpha": torch.tensor(4.0)}, str(tmp_path / "lora.safetensors"))
    merged = apply_loras(view, [LoraSpec(tmp_path / "lora.safetensors", strength=0.7)], "dit")
    state = view.state_dict()
    state["blocks.1.self_attn.q.weight"] = state["blocks.1.self_attn.q.weight"] + 0.7 * up @ down
    case = CASES["t2v"]
    inputs = make_inputs(case, batch=2, grid=GRIDS[0], seed=6)
    with torch.no_grad():
        got = load_dit(merged, case.cfg)(*inputs.values())
        base = load_dit(view, case.cfg)(*inputs.values())
    want = diffusers_forward(diffusers_from_state(case.cfg, state), case, inputs)
    assert rel_err(got, want) < 1e-4
    assert rel_err(base, want) > 1e-3  # the LoRA changed the output
