"""The Wan2.2-Animate DiT exported to ONNX: ONNX Runtime equals the torch module at two dynamic shapes of one
export (latent frames/height/width, with pose frames = frames - 1 and face frames = 4 * (frames - 2) + 1
tied to them), the graph passes the TensorRT lint, and the motion directions' QR basis is a constant.

One DiT block with a face adapter block after it (`adapter_every=1`) keeps the export fast; the
module itself is checked against diffusers at five blocks in tests/export/models/test_wan_animate.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wanrt.export.models.wan_animate import WanAnimateDiT, load_animate_dit, motion_basis
from wanrt.export.onnx.dit import export_dit_onnx
from wanrt.export.onnx.lint import lint_onnx
from tests.export.models.animate_cases import CFG, animate_inputs, diffusers_animate_model, write_diffusers
from tests.export.models.dit_cases import rel_err

ONE_BLOCK = replace(CFG, num_layers=1, animate=replace(CFG.animate, adapter_every=1))
SHAPES = [(2, (3, 4, 6)), (1, (5, 6, 4))]  # (batch, latent grid): 5 and 13 face frames


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("animate_onnx")
    view = write_diffusers(diffusers_animate_model(ONE_BLOCK, seed=9), tmp / "dit.safetensors")
    files = export_dit_onnx(view, tmp / "dit", "fp32", cfg=ONE_BLOCK, progress=False).files
    return view, files, load_animate_dit(view, ONE_BLOCK)


def test_signature_and_tensorrt_lint(exported):
    _, files, module = exported
    assert lint_onnx(files[0], module.signature) == []
    sess = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [(s.name, list(s.shape)) for s in module.signature.inputs]
    assert module.signature.input_names[-2:] == ["pose_latent", "face_pixels"]


def test_official_initializers_and_the_qr_basis(exported):
    view, files, _ = exported
    inits = {t.name: t for t in onnx.load(str(files[0])).graph.initializer}
    assert "face_adapter.fuser_blocks.0.linear1_kv.weight" in inits and "pose_patch_embedding.weight" in inits
    q = motion_basis(view.load("motion_encoder.dec.direction.weight"))
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)
    arrays = [torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in inits.values() if list(t.dims) in ([*q.shape], [*q.T.shape])]
    assert any(torch.allclose(a, b) for a in arrays for b in (q, q.T) if a.shape == b.shape)  # the basis (or its transpose) is a constant
    assert "motion_encoder.dec.direction.weight" not in inits  # the raw directions are not needed at run time
    nodes = onnx.load(str(files[0]), load_external_data=False).graph.node
    assert not any(n.op_type in ("Loop", "If") for n in nodes)
    pads = [onnx.helper.get_node_attr_value(n, "mode") if any(a.name == "mode" for a in n.attribute) else b"constant"
            for n in nodes if n.op_type == "Pad"]
    assert set(pads) <= {b"constant"}  # the causal convs' replicate padding is a Concat, the blur's a zero Pad


@pytest.mark.parametrize("batch,grid", SHAPES)
def test_onnxruntime_matches_torch(exported, batch, grid):
    _, files, module = exported
    inputs = animate_inputs(ONE_BLOCK, batch, grid, seed=11)
    sess = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = module(**inputs)
    assert got.shape == tuple(want.shape) == (batch, ONE_BLOCK.out_dim, *grid)
    assert rel_err(torch.from_numpy(np.ascontiguousarray(got)), want) < 1e-4


def test_meta_module_names_match_the_export_weights():
    with torch.device("meta"):
        module = WanAnimateDiT(ONE_BLOCK)
    assert "motion_encoder.dec.direction.basis" not in module.state_dict()  # derived, never read from a checkpoint
