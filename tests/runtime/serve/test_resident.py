"""A replica's engines stay loaded between jobs when the bundle fits the budget, with results identical to `run`'s loading."""

from __future__ import annotations

import numpy as np

from tests.runtime.recording import RecordingBackend
from wanrt.engines.manifest import read_manifest
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
from wanrt.runtime.pipeline import GenerationRequest, WanPipeline
from wanrt.runtime.serve.resident import KeepLoaded, keeps_whole_bundle, replica_backend


def generate(backend, bundle, seed):
    pipe = WanPipeline(bundle, read_manifest(bundle), backend)
    return pipe.generate(pipe.prepare(GenerationRequest(prompt="a red fox", seed=seed, steps=4))).video


def test_kept_engines_load_once_and_give_the_videos_of_per_stage_loading(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    plain, counting = RecordingBackend(), RecordingBackend()
    kept = KeepLoaded(counting)
    for seed in (1, 2, 3):
        assert np.array_equal(generate(kept, bundle, seed), generate(plain, bundle, seed))
    names = sorted(e.name for e in counting.engines)
    assert names == ["dit_high_noise", "dit_low_noise", "text_encoder", "vae_decoder"]  # once each, for three jobs
    assert len(plain.engines) == 3 * 4 and all(e.released for e in plain.engines)  # run: loaded and released per job
    assert not any(e.released for e in counting.engines)
    kept.close()
    assert all(e.released for e in counting.engines) and kept.loaded == []


def test_the_whole_bundle_is_kept_only_when_it_fits_the_budget(bundle_factory):
    bundle = bundle_factory("moe_t2v")
    manifest = read_manifest(bundle)
    backend = OnnxRuntimeBackend()
    comps = manifest.components.values()
    total = sum(backend.weight_bytes(c, bundle) for c in comps) + max(backend.activation_bytes(c, bundle) for c in comps)
    total += backend.memory_margin_bytes
    assert keeps_whole_bundle(backend, manifest, bundle, total)
    assert not keeps_whole_bundle(backend, manifest, bundle, total - 1)
    assert keeps_whole_bundle(backend, manifest, bundle, None)
    assert isinstance(replica_backend(backend, manifest, bundle, total), KeepLoaded)
    assert replica_backend(backend, manifest, bundle, total - 1) is backend
