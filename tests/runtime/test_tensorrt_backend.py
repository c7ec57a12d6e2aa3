"""The TensorRT backend without a GPU: the real tensorrt_lean and cuda-python modules, plan and runtime choice,
`--backend auto`, dtype conversion, the plan reader; tests that need a GPU (and TensorRT's builder) skip with the reason.

What runs here for real: `import tensorrt_lean` (11.4) and `cuda.bindings.runtime` (cuda-python), whose calls
return error codes on a machine without an NVIDIA driver; `trt.Runtime(logger)` (TensorRT logs CUDA error 35
through our logger and returns).  `deserialize_cuda_engine` is never called without a GPU (it segfaults).
"""

from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import read_manifest
from wanrt.engines.plans import PlanInfo, ProfileShapes
from wanrt.runtime import cuda
from wanrt.runtime.backends import choose_backend, make_backend
from wanrt.runtime.backends import tensorrt as trt_backend
from wanrt.runtime.backends.tensorrt import (
    PlanChunks, TensorRTProbe, TensorRTRuntime, bf16_to_float32, float32_to_bf16, from_engine, need_from_plan,
    runtime_for_plan, select_plan, to_engine,
)  # fmt: skip
from tests.tensorrt_surface import Surface, check_source

REPO = Path(__file__).resolve().parents[2]
BACKEND_SOURCE = REPO / "runtime" / "backends" / "tensorrt.py"


def import_lean():
    try:
        import tensorrt_lean
    except ImportError as e:
        pytest.skip(f"tensorrt_lean is not installed ({e}); pip install tensorrt-lean-cu12==11.4.0.106")
    return tensorrt_lean


def has_gpu() -> bool:
    try:
        return cuda.no_device_reason() is None
    except WanrtError:
        return False


needs_no_gpu = pytest.mark.skipif(has_gpu(), reason="checks the behaviour without an NVIDIA driver; this machine has a GPU")
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU and driver (none here)")


# ---- the API our backend uses exists in the real bindings ---------------------------------------


def used_names() -> set[str]:
    """Every TensorRT name the backend uses whose owner the checker could type ("Class.attr", "trt.X", "trt.Enum.M")."""
    findings = check_source(BACKEND_SOURCE, Surface.load("tensorrt_lean"))
    assert not [f.text for f in findings if f.kind == "error"]
    names = set()
    for f in findings:
        if f.kind == "checked":
            names.add(f.text.split(" with ")[0].removesuffix("(...)").removesuffix(" = ..."))
    return names


def test_every_name_the_backend_uses_exists_in_the_real_tensorrt_lean():
    trt = import_lean()
    assert trt.__version__ == "11.4.0.106", "the surface in tests/data/ is 11.4.0.106; test against the same version"
    missing = []
    for name in sorted(used_names()):
        parts = name.split(".")
        obj = trt if parts[0] == "trt" else getattr(trt, parts[0], None)
        for part in parts[1:]:
            obj = getattr(obj, part, None) if obj is not None else None
        if obj is None:
            missing.append(name)
    assert not missing, missing


def test_the_check_really_covers_the_calls_that_matter():
    names = used_names()
    for name in (
        "Runtime.deserialize_cuda_engine", "Runtime.engine_host_code_allowed", "trt.IStreamReaderV2",
        "ICudaEngine.weight_streaming_budget_v2", "ICudaEngine.streamable_weights_size",
        "ICudaEngine.create_execution_context", "trt.ExecutionContextAllocationStrategy.USER_MANAGED",
        "IExecutionContext.set_device_memory", "IExecutionContext.update_device_memory_size_for_shapes",
        "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
        "IExecutionContext.set_optimization_profile_async", "ICudaEngine.get_tensor_profile_shape",
        "ICudaEngine.get_engine_stat", "trt.SeekPosition.SET",
    ):  # fmt: skip
        assert name in names, (name, sorted(names))


def test_the_int32_automatic_budget_call_is_never_used():
    """tensorrt.md §2: get_weight_streaming_automatic_budget's binding returns int32 (overflows above 2 GiB)."""
    for path in sorted((REPO / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr != "get_weight_streaming_automatic_budget", f"{path}:{node.lineno}"


@needs_no_gpu
def test_runtime_creation_failure_is_one_clear_line_with_tensorrts_message():
    """Without a driver, trt.Runtime(logger) logs CUDA error 35 through our logger; we raise it as one line."""
    trt = import_lean()
    rt = TensorRTRuntime("tensorrt_lean", "lean", trt.__version__, trt)
    book = trt_backend.LogBook()
    with pytest.raises(WanrtError, match=r"tensorrt_lean 11\.4\.0\.106 cannot start: .*(cudaError 35|error: 35)") as err:
        trt_backend.open_runtime(rt, book)
    assert "\n" not in str(err.value)
    assert book.errors and any("CUDA initialization failure" in e for e in book.errors)


@needs_no_gpu
def test_the_plan_reader_needs_the_cuda_driver():
    """The real IStreamReaderV2 trampoline opens libcuda in its constructor (pyCore.cpp)."""
    trt = import_lean()
    with open(__file__, "rb") as f, pytest.raises(RuntimeError, match="Failed to open cuda driver"):
        trt_backend.plan_reader(trt, f)


def test_plan_chunks_read_in_pieces_and_seek(tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "model.plan"
    path.write_bytes(data)
    with path.open("rb") as f:
        chunks = PlanChunks(f, chunk=4096)
        got = []
        while piece := chunks.read(10240 - sum(map(len, got)), 0):
            got.append(piece)
        assert [len(p) for p in got] == [4096, 4096, 2048] and b"".join(got) == data
        assert chunks.seek_to(-16, os.SEEK_END) and chunks.read(100, 0) == data[-16:]
        assert chunks.seek_to(3, os.SEEK_SET) and chunks.seek_to(2, os.SEEK_CUR) and chunks.read(2, 0) == data[5:7]
        assert not chunks.seek_to(-1, os.SEEK_SET)


# ---- cuda-python for real, without a driver ------------------------------------------------------


@needs_no_gpu
def test_no_cuda_device_is_a_clear_message():
    assert cuda.no_device_reason() == "no NVIDIA driver is loaded (libcuda not found)"
    with pytest.raises(cuda.CudaError, match="no NVIDIA driver is loaded"):
        cuda.device_info(0)
    with pytest.raises(cuda.CudaError, match=r"cudaMemGetInfo failed: cudaErrorInsufficientDriver \(CUDA driver version is insufficient"):
        cuda.memory_info()
    with pytest.raises(cuda.CudaError, match=r"allocating 1024 bytes for the pool failed: cudaErrorInsufficientDriver"):
        cuda.DeviceBuffer.allocate(1024, "the pool")
    with pytest.raises(WanrtError, match="--backend tensorrt: no NVIDIA driver is loaded"):
        make_backend("tensorrt")


def test_a_pinned_view_is_the_buffer_itself():
    """`PinnedBuffer.array` over real host memory (a ctypes buffer standing in for cudaMallocHost's)."""
    import ctypes

    raw = (ctypes.c_byte * 64)()
    buf = cuda.PinnedBuffer(ctypes.addressof(raw), 64)
    view = buf.array((2, 4), np.float32)
    view[:] = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.frombuffer(bytes(raw)[:32], np.float32).tolist() == list(range(8))
    with pytest.raises(ValueError, match="do not fit a pinned buffer of 64"):
        buf.array((17,), np.float32)


# ---- which plan, which runtime, which backend ----------------------------------------------------

LEAN = TensorRTRuntime("tensorrt_lean", "lean", "11.4.0.106")
FULL = TensorRTRuntime("tensorrt", "full", "11.4.0.106")
H100 = cuda.DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 80 << 30)


def plan(**kw) -> PlanInfo:
    return PlanInfo(**{"path": "dit/model.plan", "tensorrt_version": "11.4.0.106", "compute_capability": "9.0", **kw})


@pytest.mark.parametrize(
    "info,runtimes,chosen,why",
    [
        (plan(), [LEAN, FULL], FULL, "(lean) runs only version-compatible plans"),
        (plan(), [LEAN], None, "runs only version-compatible plans; dit/model.plan is not"),
        (plan(version_compatible=True, tensorrt_version="11.1.0.106"), [LEAN, FULL], LEAN, ""),
        (plan(version_compatible=True, lean_runtime_excluded=True), [FULL], None, "EXCLUDE_LEAN_RUNTIME); it needs tensorrt_lean"),
        (plan(version_compatible=True, tensorrt_version="10.13.3.9"), [LEAN], None, "within major version 10"),
        (plan(tensorrt_version="11.3.0.99"), [FULL], None, "built with TensorRT 11.3.0.99; this box has TensorRT 11.4.0.106"),
        (plan(), [], None, "no TensorRT runtime imports"),
        (plan(version_compatible=True, stripped=True), [LEAN, FULL], FULL, "is stripped (STRIP_PLAN); its weights are refitted"),
        (plan(version_compatible=True, stripped=True), [LEAN], None, "needs the full tensorrt's ONNX refitter"),
    ],
)
def test_runtime_for_plan(info, runtimes, chosen, why):
    rt, reasons = runtime_for_plan(info, runtimes, "9.0")
    assert rt == chosen
    assert why in " ".join(reasons)


@pytest.fixture(scope="module")
def moe_manifest(bundle_factory):
    return read_manifest(bundle_factory("moe_t2v"))


def with_plans(manifest, **plan_fields):
    comps = {
        n: dataclasses.replace(c, plans=[plan(path=f"{n}/model.plan", **plan_fields)]) for n, c in manifest.components.items()
    }
    return dataclasses.replace(manifest, components=comps)


def test_auto_picks_tensorrt_when_every_component_has_a_runnable_plan(moe_manifest):
    probe = TensorRTProbe(H100, (LEAN,))
    choice = choose_backend("auto", with_plans(moe_manifest, version_compatible=True), probe=probe)
    assert choice.name == "tensorrt"
    assert choice.reason == (
        "every component has a plan for NVIDIA H100 80GB HBM3 (compute capability 9.0) that tensorrt_lean 11.4.0.106 runs"
    )
    assert choice.plans["dit_high_noise"] == "dit_high_noise/model.plan (tensorrt_lean 11.4.0.106)"
    assert choice.to_dict()["chosen"] == "tensorrt" and choice.to_dict()["requested"] == "auto"


def test_auto_falls_back_to_onnxruntime_and_says_why(moe_manifest):
    assert choose_backend("auto", moe_manifest).reason == "the bundle holds no TensorRT plans"
    lean_only = choose_backend("auto", with_plans(moe_manifest), probe=TensorRTProbe(H100, (LEAN,)))
    assert lean_only.name == "onnxruntime"
    assert lean_only.reason.startswith("not every component has a plan for this GPU: ")
    assert "runs only version-compatible plans" in lean_only.reason
    other_gpu = choose_backend(
        "auto", with_plans(moe_manifest, compute_capability="8.9"), probe=TensorRTProbe(H100, (FULL,))
    )
    assert other_gpu.name == "onnxruntime" and "built for compute capability 8.9; this GPU is 9.0" in other_gpu.reason
    broken = choose_backend("auto", with_plans(moe_manifest), probe=TensorRTProbe(None, (), "no CUDA device"))
    assert broken.name == "onnxruntime" and broken.reason == "TensorRT cannot run here: no CUDA device"
    assert choose_backend("onnxruntime", with_plans(moe_manifest)).reason == "requested with --backend onnxruntime"


def test_backend_tensorrt_fails_with_the_reason(moe_manifest):
    with pytest.raises(WanrtError, match=r"--backend tensorrt: the bundle holds no TensorRT plans \(build them"):
        choose_backend("tensorrt", moe_manifest)
    with pytest.raises(WanrtError, match=r"--backend tensorrt: dit_high_noise: .*runs only version-compatible plans"):
        choose_backend("tensorrt", with_plans(moe_manifest), probe=TensorRTProbe(H100, (LEAN,)))
    with pytest.raises(WanrtError, match="unknown backend 'tensorflow'"):
        choose_backend("tensorflow", moe_manifest)


@needs_no_gpu
def test_auto_on_this_machine_is_onnxruntime_because_there_is_no_driver(moe_manifest):
    choice = choose_backend("auto", with_plans(moe_manifest, version_compatible=True))
    assert choice.name == "onnxruntime" and choice.reason == "TensorRT cannot run here: no NVIDIA driver is loaded (libcuda not found)"


def test_select_plan_prefers_the_exact_gpu_and_a_non_version_compatible_plan(moe_manifest):
    comp = moe_manifest.components["dit_low_noise"]
    vc = plan(path="a/vc.plan", version_compatible=True)
    exact = plan(path="a/exact.plan")
    ampere = plan(path="a/ampere.plan", compute_capability="8.0", hardware_compatibility="AMPERE_PLUS")
    chosen, rt, why = select_plan(dataclasses.replace(comp, plans=[ampere, vc, exact]), [LEAN, FULL], "9.0")
    assert chosen is exact and rt == FULL and why == []
    chosen, rt, _ = select_plan(dataclasses.replace(comp, plans=[ampere, vc, exact]), [LEAN], "9.0")
    assert chosen is vc and rt == LEAN
    none, _, why = select_plan(dataclasses.replace(comp, plans=[]), [FULL], "9.0")
    assert none is None and "has no TensorRT plan" in why[0]


def test_need_from_plan_uses_the_profile_measurement_and_the_streamable_bytes(moe_manifest):
    comp = moe_manifest.components["dit_high_noise"]
    shapes = {"latent": (1, 16, 5, 4, 6), "timestep": (1,), "context": (1, 512, 8)}
    small = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (1, 16, 5, 4, 6), (1, 16, 5, 4, 6))}, 3 << 20)
    large = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (2, 16, 21, 90, 160), (2, 16, 21, 90, 160))}, 9 << 30)
    info = plan(weight_streaming=True, streamable_weights_bytes=2000, profiles=[small, large])
    need = need_from_plan(comp, info, 2100, shapes)
    assert (need.weight_bytes, need.streamable_bytes, need.fixed_bytes) == (2100, 2000, 100)
    assert need.activation_bytes == 3 << 20 and need.activation_source == "plan"
    assert need.streaming_scratch_bytes == 100  # 1/20 of the streamable bytes until measured at load
    assert need.io_bytes == 2 * (16 * 5 * 4 * 6 * 4) + 4 + 512 * 8 * 4
    bigger = need_from_plan(comp, info, 2100, {**shapes, "latent": (2, 16, 21, 60, 104)})
    assert bigger.activation_bytes == 9 << 30  # the first profile holding the shape
    unmeasured = need_from_plan(comp, plan(), 2100, shapes)
    assert unmeasured.activation_bytes is None and unmeasured.streamable_bytes == 0  # the pipeline estimates it


def test_a_batch_above_the_plans_profiles_counts_one_call(moe_manifest):
    """CFG feeds batch 2; a plan whose profiles take batch 1 runs it as two calls: the need is one call's."""
    comp = moe_manifest.components["dit_high_noise"]
    one = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (1, 16, 5, 4, 6), (1, 16, 21, 90, 160))}, 5 << 20)
    info = plan(profiles=[one])
    shapes = {"latent": (2, 16, 5, 4, 6), "timestep": (2,), "context": (2, 512, 8)}
    need = need_from_plan(comp, info, 100, shapes)
    assert need.activation_bytes == 5 << 20  # the batch-1 profile holds one call
    assert need.io_bytes == 2 * (16 * 5 * 4 * 6 * 4) + 4 + 512 * 8 * 4  # one call's buffers, reused by the second


# ---- dtypes ---------------------------------------------------------------------------------------


def test_bf16_conversion_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (the export extra) is the bf16 reference")
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 100,
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.3895314e38, 1.00390625, 1.01171875], np.float32),
    ])  # fmt: skip
    ours = float32_to_bf16(x)
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.array_equal(bf16_to_float32(ours), ref.view(ml_dtypes.bfloat16).astype(np.float32))
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_engine_dtype_round_trips():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    half = to_engine(x, "HALF")
    assert half.dtype == np.float16 and np.allclose(from_engine(half, "HALF", "float32"), x, atol=1e-3)
    same = to_engine(x, "FLOAT")
    assert same.dtype == np.float32 and from_engine(same, "FLOAT", "float32") is not same
    assert to_engine(np.array([True]), "BOOL").dtype == np.bool_
    with pytest.raises(WanrtError, match="TensorRT tensor type FP8 has no host representation"):
        to_engine(x, "FP8")


# ---- on a GPU -------------------------------------------------------------------------------------


@needs_gpu
def test_the_cuda_layer_on_a_gpu():
    """bench/cuda_layer.py's checks, small: pool, pinned round trip ordered by events, a captured graph."""
    import runpy

    module = runpy.run_path(str(REPO / "bench" / "cuda_layer.py"))
    report = module["exercise"](mib=8, repeats=2)
    assert report["round_trip_exact"] and report["graph_replay_exact"] and report["pool_freed"]


def test_a_built_plan_runs_through_the_backend(tmp_path):
    """y = 2x + 1 on a dynamic batch: built with the full TensorRT from ONNX, run by our backend (pool, buffers, events)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        pytest.skip(f"needs the full TensorRT (the builder) and a GPU: tensorrt does not import ({e})")
    if not has_gpu():
        pytest.skip("needs an NVIDIA GPU to build and run a plan")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from wanrt.engines.manifest import Component
    from wanrt.engines.signatures import EngineSignature, TensorSpec
    from wanrt.runtime.backends.tensorrt import TensorRTBackend

    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])]
    graph = helper.make_graph(
        nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.float32(2.0).reshape(()), "two"), numpy_helper.from_array(np.float32(1.0).reshape(()), "one")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (2, 4), (2, 4))
    config.add_optimization_profile(profile)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    onnx.save(model, tmp_path / "tiny" / "model.onnx")
    info = cuda.device_info(0)
    sig = EngineSignature((TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 4)),), {"batch": (1, 2)})
    comp = Component("tiny", "dit", "tiny/model.onnx", sig, "fp32", plans=[PlanInfo("tiny/model.plan", trt.__version__, info.compute_capability)])
    backend = TensorRTBackend(cuda_graphs=True)
    engine = backend.load(comp, tmp_path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for _ in range(3):  # the second and third calls replay the captured graph
        np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x + 1)
    np.testing.assert_array_equal(engine.run({"x": x[:1]})["y"], 2 * x[:1] + 1)  # new shape: rebound
    assert engine.gpu_seconds > 0 and engine.graph_replays == 2 and not backend.take_warnings()
    engine.release()
    backend.close()


def test_a_plan_only_bundle_cannot_fall_back_to_onnxruntime(moe_manifest):
    """A `--target trt` bundle (onnx null): where TensorRT cannot run it, the choice fails naming why, not falls back."""
    plan_only = with_plans(moe_manifest)
    plan_only = dataclasses.replace(plan_only, components={
        n: dataclasses.replace(c, onnx=None, files=[]) for n, c in plan_only.components.items()})  # fmt: skip
    with pytest.raises(WanrtError, match=r"--backend auto: TensorRT cannot run here: no CUDA device, and component "
                                         r"'dit_high_noise' has no ONNX graph .* rebuild with --target all"):  # fmt: skip
        choose_backend("auto", plan_only, probe=TensorRTProbe(None, (), "no CUDA device"))
    with pytest.raises(WanrtError, match="--backend onnxruntime: requested with --backend onnxruntime, and component"):
        choose_backend("onnxruntime", plan_only)
    assert choose_backend("auto", plan_only, probe=TensorRTProbe(H100, (FULL,))).name == "tensorrt"
