"""The pipeline's progress callback: it hears each stage and each denoising step, and raising from it stops the run."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.recording import RecordingBackend
from wanrt.engines.manifest import read_manifest
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("moe_t2v")


def test_progress_hears_every_stage_and_step_and_changes_nothing(bundle):
    pipe = WanPipeline(bundle, read_manifest(bundle), RecordingBackend())
    plan = pipe.prepare(GenerationRequest(prompt="a red fox", seed=5, steps=4))
    events = []
    heard = pipe.generate(plan, on_progress=lambda *e: events.append(e))
    assert events == [("text_encoder", 0, 0), ("denoise", 0, 4), ("denoise", 1, 4), ("denoise", 2, 4), ("denoise", 3, 4),
                      ("denoise", 4, 4), ("vae_decoder", 0, 0)]  # fmt: skip
    assert np.array_equal(heard.video, pipe.generate(plan).video)


def test_raising_from_progress_stops_at_that_step_with_every_engine_released(bundle):
    backend = RecordingBackend()
    pipe = WanPipeline(bundle, read_manifest(bundle), backend)
    plan = pipe.prepare(GenerationRequest(prompt="a red fox", seed=5, steps=6))
    steps = []

    def on_progress(stage, step, total):
        if stage == "denoise" and step:
            steps.append(step)
            if step == 2:
                raise Stop

    with pytest.raises(Stop):
        pipe.generate(plan, on_progress=on_progress)
    assert steps == [1, 2] and [e.name for e in backend.engines] == ["text_encoder", "dit_high_noise"]
    assert all(e.released for e in backend.engines)  # the low-noise expert and the decoder never loaded
