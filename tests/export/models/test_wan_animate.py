"""WanAnimateDiT equals diffusers' WanAnimateTransformer3DModel (tiny random weights, diffusers layout).

The diffusers model's state dict is saved as it is and read back through the checkpoint layer
(`CheckpointView` maps the diffusers names, the split to_k/to_v and the flat FusedLeakyReLU biases
onto the official `WanAnimateModel` names); diffusers' own `convert_wan_transformer_to_diffusers`
checks the official names independently.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wanrt.engines.model import AnimateConfig, DiTConfig
from wanrt.export.checkpoint.dit_config import infer_dit_config
from wanrt.export.models.wan_animate import WanAnimateDiT, expected_animate_parameters, load_animate_dit
from wanrt.export.models.wan_dit import DiTError
from tests.export.models.animate_cases import (
    CFG,
    animate_inputs,
    diffusers_animate_forward,
    diffusers_animate_model,
    write_diffusers,
)
from tests.export.models.dit_cases import rel_err

GRIDS = [(3, 4, 6), (4, 6, 4)]  # latent (frames, height, width): 5 and 9 face frames


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = diffusers_animate_model(CFG, seed=3)
    return model, write_diffusers(model, tmp_path_factory.mktemp("animate") / "diffusion_pytorch_model.safetensors")


def test_diffusers_layout_reads_under_the_official_names(reference):
    _, view = reference
    assert view.unknown_keys == []
    assert infer_dit_config(view.shapes(), "tiny") == CFG
    ours = {k: tuple(p.shape) for k, p in WanAnimateDiT(CFG).named_parameters()}
    assert ours == {k: tuple(view[k].shape) for k in view}
    assert view["motion_encoder.enc.net_app.convs.1.conv1.1.bias"].shape == (1, 8, 1, 1)  # official FusedLeakyReLU bias
    assert view["face_adapter.fuser_blocks.0.linear1_kv.weight"].shape == (2 * CFG.dim, CFG.dim)


def test_official_names_convert_back_with_diffusers_own_converter():
    """Seven ResBlocks (512 px faces): the layout diffusers' converter hard-codes (convs.1..7, convs.8)."""
    a = AnimateConfig(motion_channels=(4, 4, 4, 8, 8, 8, 8, 8), motion_style_dim=16, motion_dim=4, motion_out_dim=16,
                      face_hidden_dim=16)
    cfg = replace(CFG, animate=a)
    official = WanAnimateDiT(cfg).state_dict()
    kernels = {f"motion_encoder.enc.net_app.convs.{i}.{m}.0.kernel": torch.zeros(4, 4) for i in range(1, 8) for m in ("conv2", "skip")}
    converted = convert_wan_transformer_to_diffusers({**official, **kernels})
    want = diffusers_animate_model(cfg, seed=0).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items() if not k.endswith(".kernel")} == {k: tuple(v.shape) for k, v in want.items()}


def test_real_size_key_count():
    """The released Wan2.2-Animate-14B checkpoint holds 1441 tensors, 14 of them Blur kernels the module rebuilds."""
    real = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16, image_branch=True,
                     clip_tokens=257, animate=AnimateConfig())
    params = expected_animate_parameters(real)
    assert len(params) == 1441 - 14
    assert params["face_adapter.fuser_blocks.7.linear1_kv.weight"] == (10240, 5120)
    assert params["motion_encoder.enc.net_app.convs.8.weight"] == (512, 512, 4, 4)
    assert params["face_encoder.conv1_local.conv.weight"] == (4096, 512, 3)


@pytest.mark.parametrize("grid", GRIDS)
def test_fp32_matches_diffusers(grid, reference):
    model, view = reference
    inputs = animate_inputs(CFG, batch=2, grid=grid, seed=1)
    with torch.no_grad():
        got = load_animate_dit(view, CFG)(**inputs)
    assert rel_err(got, diffusers_animate_forward(model, inputs)) < 1e-4


def test_bf16_matches_diffusers_fp32(reference):
    model, view = reference
    inputs = animate_inputs(CFG, batch=1, grid=GRIDS[0], seed=2)
    with torch.no_grad():
        got = load_animate_dit(view, CFG, dtype=torch.bfloat16)(**inputs)
    assert rel_err(got, diffusers_animate_forward(model, inputs)) < 2e-2


def test_pose_and_face_change_the_prediction(reference):
    _, view = reference
    ours = load_animate_dit(view, CFG)
    inputs = animate_inputs(CFG, batch=1, grid=GRIDS[0], seed=4)
    with torch.no_grad():
        base = ours(**inputs)
        for name in ("pose_latent", "face_pixels"):
            changed = dict(inputs, **{name: -inputs[name]})
            assert rel_err(ours(**changed), base) > 1e-3, name


def test_missing_face_input_is_an_error(reference):
    _, view = reference
    inputs = animate_inputs(CFG, batch=1, grid=GRIDS[0], seed=4)
    del inputs["face_pixels"]
    with pytest.raises(DiTError, match="face_pixels"):
        load_animate_dit(view, CFG)(**inputs)
