"""A generation whose latents turn NaN or infinite stops with one clear error naming the step, not a black video."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import read_manifest
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from wanrt.runtime.pipeline import GenerationRequest, NonFiniteLatentsError, WanPipeline


def poison_expert(bundle, component: str, value: float) -> None:
    """Set the expert's padding weights (added as 0 * sum(pad)) to `value`: 0 * NaN or 0 * inf is NaN."""
    path = bundle / component / "model.onnx"
    model = onnx.load(str(path))  # external data loaded alongside
    for init in model.graph.initializer:
        if init.name == "pad":
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, value, np.float32), "pad"))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=128)  # fmt: skip


@pytest.mark.parametrize("component, value", [("dit_high_noise", np.nan), ("dit_low_noise", np.inf)])
def test_non_finite_latents_stop_the_run_at_the_step(bundle_factory, tmp_path, component, value):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_factory("moe_t2v"), bundle)
    poison_expert(bundle, component, value)
    pipe = WanPipeline(bundle, read_manifest(bundle), OnnxRuntimeBackend())
    plan = pipe.prepare(GenerationRequest(prompt="a red fox", seed=3, steps=6))
    first = next(s for s in plan.steps if s.expert == component)
    with pytest.raises(NonFiniteLatentsError) as e:
        pipe.generate(plan)
    message = str(e.value)
    assert isinstance(e.value, WanrtError) and "\n" not in message
    assert message.startswith(f"step {first.index + 1} of 6 ({component}, timestep {first.timestep:g}):"), message
    assert "NaN or infinite" in message and "no video is written" in message


def test_finite_runs_are_unchanged(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    pipe = WanPipeline(bundle, read_manifest(bundle), OnnxRuntimeBackend())
    result = pipe.generate(pipe.prepare(GenerationRequest(prompt="a red fox", seed=3, steps=6)))
    assert np.isfinite(result.latents).all() and np.isfinite(result.video).all()
