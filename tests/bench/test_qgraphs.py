"""bench/qgraphs.py: the block outputs it adds are diffusers' residual stream after each block; its error measures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.export.models.dit_cases import CASES, diffusers_model, make_inputs, official_state, write_official
from wanrt.bench.qgraphs import block_outputs, calibrate_w8a8, compare, export_graph, session, with_outputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny t2v diffusers DiT, its official-layout view and its fp32 and int8 W8A16 graphs."""
    case = CASES["t2v"]
    model = diffusers_model(case, seed=3)
    root = tmp_path_factory.mktemp("qgraphs")
    view = write_official(official_state(model), root / "dit.safetensors")
    fp32, _ = export_graph(view, case.cfg, root / "fp32", None)
    w8a16, _ = export_graph(view, case.cfg, root / "int8", "int8")
    return case, model, fp32, w8a16


def test_block_outputs_are_diffusers_hidden_states_after_each_block(tiny):
    case, model, fp32, _ = tiny
    inputs = make_inputs(case, batch=2, grid=(2, 4, 6), seed=0)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out.detach().numpy().copy())) for b in model.blocks]
    with torch.no_grad():
        model(inputs["latent"], inputs["timestep"], inputs["context"], return_dict=False)
    for h in hooks:
        h.remove()
    graph = onnx.load(str(fp32), load_external_data=False)
    names = block_outputs(graph)
    assert len(names) == case.cfg.num_layers
    got = session(fp32, model=with_outputs(graph, names)).run(names, {k: v.numpy() for k, v in inputs.items()})
    for i, (ours, ref) in enumerate(zip(got, seen)):
        assert ours.shape == (ref.shape[0], 1, *ref.shape[1:]), i  # our stream is [B, T, N, D], T = 1 timestep group
        np.testing.assert_allclose(ours.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"block {i}")


def test_w8a8_graph_keeps_the_block_outputs_and_stays_near_fp32(tiny):
    case, _, fp32, w8a16 = tiny
    feeds = {k: v.numpy() for k, v in make_inputs(case, batch=2, grid=(2, 4, 6), seed=1).items()}
    w8a8, scales, _ = calibrate_w8a8(w8a16, "int8", [feeds])
    assert scales and all(s > 0 for s in scales.values())
    held_out = {k: v.numpy() for k, v in make_inputs(case, batch=2, grid=(2, 4, 6), seed=2).items()}
    outs = []
    for g in (fp32, w8a8):
        model = onnx.load(str(g), load_external_data=False)
        names = [*block_outputs(model), "noise_pred"]
        outs.append(session(g, model=with_outputs(model, names)).run(names, held_out))
    for ours, ref in zip(*outs[::-1]):
        assert compare(ours, ref)["cosine"] > 0.99


def test_compare_against_hand_worked_values():
    ref = np.array([3.0, 4.0])
    assert compare(ref, ref) == {"cosine": pytest.approx(1.0), "rel_l2": 0.0}
    assert compare(np.array([4.0, -3.0]), ref) == {"cosine": pytest.approx(0.0), "rel_l2": pytest.approx(2**0.5)}
    assert compare(2 * ref, ref) == {"cosine": pytest.approx(1.0), "rel_l2": pytest.approx(1.0)}
