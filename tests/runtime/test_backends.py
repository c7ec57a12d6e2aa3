"""ONNX Runtime backend on real bundles: load, bind (with clear errors), run, release, activation pools."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from onnx import TensorProto, helper, numpy_helper

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component, read_manifest
from wanrt.engines.signatures import EngineSignature, TensorSpec
from wanrt.runtime.backends import EngineInputError, EngineRunError, make_backend
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions, cuda_available
from tests.runtime.bundles import TEXT_DIM, dit_fn, save_graph


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("moe_t2v")


@pytest.fixture(scope="module")
def backend():
    return make_backend("onnxruntime")


def dit_feeds(batch=1, frames=2, h=4, w=6, in_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latent": rng.standard_normal((batch, in_dim, frames, h, w), dtype=np.float32),
        "timestep": np.full((batch,), 875.0, dtype=np.float32),
        "context": rng.standard_normal((batch, 512, TEXT_DIM), dtype=np.float32),
    }


def test_load_run_release_matches_numpy(bundle, backend):
    manifest = read_manifest(bundle)
    for name in ("dit_high_noise", "dit_low_noise"):
        engine = backend.load(manifest.components[name], bundle)
        assert engine.providers == ["CPUExecutionProvider"] and backend.device == "cpu"
        assert engine.resident_bytes == sum((bundle / f).stat().st_size for f in manifest.components[name].files)
        feeds = dit_feeds(batch=2)
        out = engine.run(feeds)
        assert list(out) == ["noise_pred"]
        np.testing.assert_allclose(out["noise_pred"], dit_fn(name, 16)(**feeds), rtol=1e-5, atol=1e-5)
        assert engine.calls == 1 and engine.run_seconds > 0
        engine.release()
        assert engine.released and engine.session is None and engine.resident_bytes == 0
        with pytest.raises(RuntimeError, match="released"):
            engine.run(feeds)
        engine.release()  # idempotent


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda f: f.pop("context"), r"missing \['context'\]"),
        (lambda f: f.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
        (lambda f: f.update(timestep=f["timestep"].astype(np.int64)), "timestep.*dtype int64, expected float32"),
        (lambda f: f.update(latent=f["latent"][0]), "latent.*expected rank 5"),
        (lambda f: f.update(latent=f["latent"][:, :15]), r"latent: shape \[1, 15, 2, 4, 6\], expected"),
        (lambda f: f.update(context=f["context"][:, :77]), r"context: shape \[1, 77, 8\]"),
        (lambda f: f.update(timestep=np.zeros(2, np.float32)), "input timestep: dim batch=2, but input latent has batch=1"),
        (lambda f: f.update(latent=np.zeros((1, 16, 2, 4, 200), np.float32)), "dim width=200 is outside the range 2..192"),
        (lambda f: f.update(context=[[0.0]]), "got list, expected a numpy array"),
    ],
)
def test_bind_errors_name_engine_input_and_expectation(bundle, backend, change, message):
    engine = backend.load(read_manifest(bundle).components["dit_low_noise"], bundle)
    feeds = dit_feeds()
    change(feeds)
    with pytest.raises(EngineInputError, match=message) as err:
        engine.run(feeds)
    assert "engine 'dit_low_noise'" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, WanrtError)


def test_batch_outside_range_is_refused(bundle, backend):
    engine = backend.load(read_manifest(bundle).components["dit_low_noise"], bundle)
    with pytest.raises(EngineInputError, match="dim batch=3 is outside the range 1..2"):
        engine.run(dit_feeds(batch=3))


def test_graph_that_does_not_match_its_signature_is_a_bundle_error(bundle, backend):
    comp = read_manifest(bundle).components["dit_low_noise"]
    renamed = dataclasses.replace(comp.signature, inputs=(TensorSpec("x", "float32", ("batch",)),) + comp.signature.inputs[1:])
    with pytest.raises(BundleError, match="graph inputs .* do not match component 'dit_low_noise' signature"):
        backend.load(dataclasses.replace(comp, signature=renamed), bundle)


def test_corrupt_or_missing_graph_is_a_bundle_error(bundle, backend, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    comp = read_manifest(copy).components["dit_high_noise"]
    (copy / comp.onnx).write_bytes(b"not an onnx file")
    with pytest.raises(BundleError, match="onnxruntime cannot load component 'dit_high_noise'"):
        backend.load(comp, copy)
    (copy / comp.onnx).unlink()
    with pytest.raises(BundleError, match="missing"):
        backend.load(comp, copy)


def test_activation_pool_ownership(bundle, backend):
    manifest = read_manifest(bundle)
    comps = [manifest.components[n] for n in manifest.experts]
    pool = backend.allocate_activations(comps, bundle)
    assert pool.components == ("dit_high_noise", "dit_low_noise")
    assert pool.size_bytes == 0  # ONNX Runtime allocates its own scratch; the pool only tracks ownership here
    high = backend.load(comps[0], bundle, activations=pool)
    low = backend.load(comps[1], bundle, activations=pool, weight_budget_bytes=0)
    assert pool.owners == {"dit_high_noise", "dit_low_noise"}
    assert not low.streams_weights  # ONNX Runtime keeps every weight resident whatever the budget
    np.testing.assert_allclose(low.run(dit_feeds())["noise_pred"], dit_fn("dit_low_noise", 16)(**dit_feeds()), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="still used by"):
        backend.free_activations(pool)
    high.release()
    low.release()
    assert pool.owners == set()
    backend.free_activations(pool)
    assert pool.freed


def test_backend_choice_and_memory_info():
    with pytest.raises(WanrtError, match="unknown backend 'tensorflow'"):
        make_backend("tensorflow")
    if not cuda_available():
        with pytest.raises(WanrtError, match="no CUDAExecutionProvider"):
            OnnxRuntimeBackend(OrtOptions(device="cuda"))
    info = make_backend().memory_info()
    assert 0 < info.free_bytes <= info.total_bytes
    so = OnnxRuntimeBackend(OrtOptions(intra_op_threads=1)).session_options()
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"


def test_run_failure_is_one_clear_line(tmp_path, backend):
    """A graph asked to allocate 4 TiB: onnxruntime's failure becomes an EngineRunError with the size and a hint."""
    sig = EngineSignature((TensorSpec("n", "int64", (1,)),), (TensorSpec("out", "float32", ("size",)),), {})
    nodes = [helper.make_node("ConstantOfShape", ["n"], ["out"], value=numpy_helper.from_array(np.zeros(1, np.float32)))]
    graph = helper.make_graph(nodes, "alloc", [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["size"])])  # fmt: skip
    files = save_graph(graph, tmp_path / "alloc" / "model.onnx")
    comp = Component("alloc", "dit", "alloc/model.onnx", sig, "fp32", files=[str(f.relative_to(tmp_path)) for f in files])
    engine = backend.load(comp, tmp_path)
    assert engine.run({"n": np.array([3], np.int64)})["out"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(EngineRunError, match=r"engine 'alloc' failed in onnxruntime: out of memory allocating 4096\.0 GiB") as err:
        engine.run({"n": np.array([2**40], np.int64)})
    assert "\n" not in str(err.value) and isinstance(err.value, WanrtError)
