"""Fixtures the calibration tests share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.export.models.dit_cases import CASES, diffusers_model, official_state, write_official
from wanrt.export.onnx.dit import export_dit_onnx


@pytest.fixture(scope="session")
def i2v(tmp_path_factory):
    """A 1-layer tiny Wan2.1 i2v DiT (image branch: all 12 block linears; self, text and image attention):
    (case, checkpoint view, its folder, its fp32 graph)."""
    tmp = tmp_path_factory.mktemp("qdq_i2v")
    case = replace(CASES["i2v"], cfg=replace(CASES["i2v"].cfg, num_layers=1))
    view = write_official(official_state(diffusers_model(case, seed=7)), tmp / "dit.safetensors")
    fp32 = export_dit_onnx(view, tmp / "fp32", "fp32", cfg=case.cfg, progress=False).graph
    return case, view, tmp, fp32
