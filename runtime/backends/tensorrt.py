"""TensorRT backend: runs a bundle's TensorRT plans through cuda-python, without torch.

Runtimes (`find_runtimes`): the lean runtime first (`import tensorrt_lean`: enough for
version-compatible plans, and the only one for plans built with EXCLUDE_LEAN_RUNTIME), the full
`tensorrt` otherwise (plans built by its exact version, and version-compatible ones, whose
embedded lean runtime it loads as trusted host code: the bundle's sha256 check vouches for it).
Which plan of a component runs here is decided from the manifest (`engines.plans`) before any
file is read: TensorRT version, compute capability, hardware compatibility, plugin archs.

One engine (tensorrt.md §2, §6):
    load    `IStreamReaderV2` over the plan file in 64 MiB pieces (no second host copy of a 14B
            plan) -> `deserialize_cuda_engine` -> I/O names, modes and ranks checked against the
            signature -> `weight_streaming_budget_v2` when the residency plan streams (before any
            context exists) -> `create_execution_context(USER_MANAGED)`
    bind    (when the input shapes change) `set_input_shape`, the optimization profile holding
            them, `update_device_memory_size_for_shapes` -> the shared activation pool grown if
            needed -> `set_device_memory(ptr, size)`; device buffers per input/output (kept and
            reused across steps), pinned host staging buffers for the latents and the other
            tensors up to 256 MiB, `set_tensor_address`
    run     host -> pinned -> device copies, `execute_async_v3` (or the CUDA graph captured after
            the first run at these shapes, with `--cuda-graphs`) between two CUDA events (the
            engine's device time), device -> host, one stream synchronize
    release context and engine (their weights), the engine's buffers; the pool stays with its owner

All device work is on one stream (`TensorRTBackend.stream`), so engines sharing the activation
pool never overlap.  Device allocations go through `runtime.cuda`; a failed one becomes a
`DeviceOutOfMemory` with the numbers (the pipeline adds the budget and the flag to change).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component, Manifest
from wanrt.engines.plans import PlanInfo, plan_runs_here, profile_for_shapes
from wanrt.engines.signatures import EngineSignature

from .. import cuda
from ..memory import MemoryNeed, Shapes, io_bytes
from .base import ActivationPool, Backend, DeviceOutOfMemory, Engine, EngineInputError, EngineRunError, MemoryInfo

# (import name, kind): the official packages' modules first, then their bare bindings wheels.
RUNTIMES = (
    ("tensorrt_lean", "lean"),
    ("tensorrt_lean_bindings", "lean"),
    ("tensorrt", "full"),
    ("tensorrt_bindings", "full"),
)
INSTALL_HINT = 'pip install "wanrt[trt-runtime]" (tensorrt-lean-cu12 and cuda-python)'
READ_CHUNK_BYTES = 64 << 20  # host bytes handed to TensorRT per read while deserializing
PINNED_LIMIT_BYTES = 256 << 20  # tensors up to this size are staged in pinned host memory
MARGIN_BYTES = 1 << 30  # kept free inside the budget: TensorRT's own allocations, allocator slack
STREAMING_SCRATCH_FRACTION = 20  # scratch estimate while streaming: 1/20 of the streamable weights
# TensorRT DataType member name -> numpy storage dtype (bf16 is stored as uint16)
ENGINE_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "uint16", "INT32": "int32", "INT64": "int64",
    "BOOL": "bool", "INT8": "int8", "UINT8": "uint8",
}  # fmt: skip
_OOM = re.compile(r"out of memory|could not be allocated|cudaErrorMemoryAllocation|OutOfMemory", re.IGNORECASE)


# ---- runtimes and plans -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTRuntime:
    """A TensorRT Python module that imported here."""

    module_name: str
    kind: str  # "lean" or "full"
    version: str
    module: Any = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return f"{self.module_name} {self.version}"


def find_runtimes() -> tuple[list[TensorRTRuntime], list[str]]:
    """The TensorRT runtimes that import (one per kind, lean first), and why the others did not."""
    found: list[TensorRTRuntime] = []
    errors: list[str] = []
    for name, kind in RUNTIMES:
        if any(r.kind == kind for r in found):
            continue
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError) as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        found.append(TensorRTRuntime(name, kind, str(getattr(module, "__version__", "?")), module))
    return found, errors


def runtime_for_plan(
    plan: PlanInfo, runtimes: Sequence[TensorRTRuntime], compute_capability: str
) -> tuple[TensorRTRuntime | None, list[str]]:
    """The runtime that runs `plan` on this GPU (lean first when the plan allows it), and why each other cannot."""
    reasons = []
    for rt in sorted(runtimes, key=lambda r: r.kind != "lean"):
        if rt.kind == "lean" and not plan.version_compatible:
            reasons.append(f"{rt.describe()} (lean) runs only version-compatible plans; {plan.path} is not")
            continue
        if rt.kind == "lean" and plan.stripped:
            reasons.append(f"{rt.describe()} (lean): {plan.path} is stripped (STRIP_PLAN); its weights are refitted from the"
                           " ONNX at load, which needs the full tensorrt's ONNX refitter")
            continue
        if rt.kind == "full" and plan.lean_runtime_excluded:
            reasons.append(f"{plan.path} was built without its lean runtime (EXCLUDE_LEAN_RUNTIME); it needs tensorrt_lean")
            continue
        ok, why = plan_runs_here(plan, rt.version, compute_capability)
        if ok:
            return rt, reasons
        reasons.append(f"{rt.describe()}: {why}")
    if not runtimes:
        reasons.append(f"no TensorRT runtime imports ({INSTALL_HINT})")
    return None, reasons


def select_plan(
    component: Component, runtimes: Sequence[TensorRTRuntime], compute_capability: str
) -> tuple[PlanInfo | None, TensorRTRuntime | None, list[str]]:
    """The plan of `component` to run here and its runtime, preferring plans built for exactly this GPU
    and not version-compatible (faster); otherwise (None, None, why each plan cannot run)."""
    if not component.plans:
        return None, None, [f"component {component.name!r} has no TensorRT plan (build it with build-engine --target trt)"]
    ranked = sorted(component.plans, key=lambda p: (p.compute_capability != compute_capability, p.version_compatible))
    reasons = []
    for plan in ranked:
        rt, why = runtime_for_plan(plan, runtimes, compute_capability)
        if rt is not None:
            return plan, rt, []
        reasons += why
    return None, None, reasons


@dataclass(frozen=True)
class TensorRTProbe:
    """What this machine offers TensorRT: the GPU, the runtimes, or why TensorRT cannot run."""

    device: cuda.DeviceInfo | None
    runtimes: tuple[TensorRTRuntime, ...] = ()
    problem: str | None = None


def probe_tensorrt(device_index: int = 0) -> TensorRTProbe:
    """Look for cuda-python, an NVIDIA driver and device `device_index`, and the TensorRT runtimes."""
    try:
        device = cuda.device_info(device_index)
    except WanrtError as e:  # cuda-python missing, no driver, no such device
        return TensorRTProbe(None, (), str(e))
    runtimes, errors = find_runtimes()
    if not runtimes:
        return TensorRTProbe(device, (), f"no TensorRT runtime imports ({'; '.join(errors)}); {INSTALL_HINT}")
    return TensorRTProbe(device, tuple(runtimes))


def plans_for_bundle(manifest: Manifest, probe: TensorRTProbe) -> tuple[dict[str, tuple[PlanInfo, TensorRTRuntime]], list[str]]:
    """The plan and runtime of every component of the bundle on this machine, and one line per component that has none."""
    chosen, problems = {}, []
    cc = probe.device.compute_capability if probe.device else "0.0"
    for name, component in manifest.components.items():
        plan, rt, why = select_plan(component, probe.runtimes, cc)
        if plan is None:
            problems.append(f"{name}: {'; '.join(why)}")
        else:
            chosen[name] = (plan, rt)
    return chosen, problems


def profile_batch_limit(plan: PlanInfo, signature: EngineSignature) -> int | None:
    """The largest batch (leading dim of the first input) the plan's recorded profiles take; None when not recorded."""
    first = signature.inputs[0]
    if not isinstance(first.shape[0], str):
        return None
    highs = [p.shapes[first.name][2][0] for p in plan.profiles if first.name in p.shapes]
    return max(highs) if highs else None


def per_call_inputs(signature: EngineSignature, inputs: Shapes, batch_limit: int | None) -> dict[str, tuple[int, ...]]:
    """The shapes of one engine call when a batch above `batch_limit` runs as several calls (CFG: cond, then uncond)."""
    lead = signature.inputs[0].shape[0]
    out = {n: tuple(s) for n, s in inputs.items()}
    if batch_limit is None or not isinstance(lead, str):
        return out
    batched = {t.name for t in signature.inputs if t.shape and t.shape[0] == lead}
    return {n: (min(s[0], batch_limit), *s[1:]) if n in batched else s for n, s in out.items()}


def need_from_plan(component: Component, plan: PlanInfo, weight_bytes: int, inputs: Shapes) -> MemoryNeed:
    """What the manifest says `plan` needs at these input shapes (activations: the profile holding them, if measured);
    a batch above the profiles' runs as several calls, so one call's shapes count."""
    inputs = per_call_inputs(component.signature, inputs, profile_batch_limit(plan, component.signature))
    streamable = int(plan.streamable_weights_bytes or 0) if plan.weight_streaming else 0
    profile = profile_for_shapes(plan, inputs) if inputs else None
    activations = profile.device_memory_bytes if profile is not None else None
    return MemoryNeed(
        component.name, weight_bytes, streamable, activations, io_bytes(component.signature, inputs) if inputs else 0,
        streamable // STREAMING_SCRATCH_FRACTION, "plan" if activations is not None else "backend",
    )


# ---- dtypes -------------------------------------------------------------------------------------


def storage_dtype(engine_dtype: str) -> np.dtype:
    """numpy storage dtype of a TensorRT DataType member name ("BF16" -> uint16)."""
    try:
        return np.dtype(ENGINE_DTYPES[engine_dtype])
    except KeyError:
        raise BundleError(f"TensorRT tensor type {engine_dtype} has no host representation here") from None


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_engine(value: np.ndarray, engine_dtype: str) -> np.ndarray:
    """A host array in the storage dtype of the engine tensor (float32 feeds -> half / bf16 when the plan says so)."""
    if engine_dtype == "BF16":
        return float32_to_bf16(value)
    return np.ascontiguousarray(value, dtype=storage_dtype(engine_dtype))


def from_engine(value: np.ndarray, engine_dtype: str, signature_dtype: str, copy: bool = True) -> np.ndarray:
    """An engine output in the signature's dtype; a copy unless `copy` is False (a staging buffer is reused)."""
    if engine_dtype == "BF16":
        return bf16_to_float32(value).astype(signature_dtype, copy=False)
    return np.array(value, dtype=signature_dtype, copy=True) if copy else value.astype(signature_dtype, copy=False)


# ---- TensorRT glue ------------------------------------------------------------------------------


class LogBook:
    """TensorRT's messages to one runtime, in order; errors end up in our error messages."""

    def __init__(self, limit: int = 1000) -> None:
        self.errors: list[str] = []
        self.other: collections.deque = collections.deque(maxlen=limit)  # warnings, info
        self.limit = limit

    def add(self, is_error: bool, message: str) -> None:
        if is_error:
            self.errors.append(message)
            del self.errors[: -self.limit]
        else:
            self.other.append(message)

    def mark(self) -> int:
        """A position to ask `errors_since` about (errors logged before it are not repeated)."""
        return len(self.errors)

    def errors_since(self, mark: int) -> list[str]:
        return self.errors[mark:]


def make_logger(trt, book: LogBook) -> "trt.ILogger":
    """A `trt.ILogger` writing into `book`."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            book.add(severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR), str(msg))

    return Logger()


def open_runtime(rt: TensorRTRuntime, book: LogBook) -> tuple["trt.Runtime", "trt.ILogger"]:
    """`trt.Runtime(logger)` and its logger; WanrtError with TensorRT's own message when it cannot start (e.g. no usable CUDA)."""
    trt = rt.module
    mark = book.mark()
    logger = make_logger(trt, book)
    runtime = trt.Runtime(logger)
    errors = book.errors_since(mark)
    if errors:
        # A Runtime that failed to initialize CUDA segfaults when destroyed (tensorrt_lean 11.4 on a machine
        # without a driver, even at interpreter exit): leak it and its logger on purpose, one reference each.
        for obj in (runtime, logger):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
        raise WanrtError(f"{rt.describe()} cannot start: {errors[-1]}")
    return runtime, logger


class PlanChunks:
    """The read/seek protocol of `IStreamReaderV2` over an open plan file, `chunk` bytes per read."""

    def __init__(self, file, chunk: int = READ_CHUNK_BYTES) -> None:
        self._file = file
        self._chunk = chunk

    def read(self, num_bytes: int, stream: int) -> bytes:
        return self._file.read(max(0, min(int(num_bytes), self._chunk)))

    def seek_to(self, offset: int, whence: int) -> bool:
        try:
            self._file.seek(int(offset), whence)
        except (OSError, ValueError):
            return False
        return True


def plan_reader(trt, file, chunk: int = READ_CHUNK_BYTES) -> "trt.IStreamReaderV2":
    """An `IStreamReaderV2` handing TensorRT `file` piece by piece (its constructor needs the CUDA driver)."""
    whence = {trt.SeekPosition.SET: os.SEEK_SET, trt.SeekPosition.CUR: os.SEEK_CUR, trt.SeekPosition.END: os.SEEK_END}

    class Reader(trt.IStreamReaderV2):
        def __init__(self) -> None:
            trt.IStreamReaderV2.__init__(self)
            self.chunks = PlanChunks(file, chunk)

        def read(self, num_bytes, stream):
            return self.chunks.read(num_bytes, stream)

        def seek(self, offset, where):
            return where in whence and self.chunks.seek_to(offset, whence[where])

    return Reader()


def tensorrt_failure(what: str, errors: list[str], requested: int = 0) -> EngineRunError:
    """An error for a TensorRT call that failed: DeviceOutOfMemory when TensorRT says memory ran out."""
    detail = errors[-1] if errors else "TensorRT reported no error"
    if any(_OOM.search(e) for e in errors):
        size = next((int(m.group(1)) for e in errors for m in [re.search(r"(\d{4,}) bytes", e)] if m), requested)
        try:
            free, total = cuda.memory_info()
        except WanrtError:
            free = total = None
        return DeviceOutOfMemory(f"out of device memory in {what}: {detail}", size, free, total)
    return EngineRunError(f"{what} failed: {detail}")


def _io_names(trt, engine: "trt.ICudaEngine") -> tuple[list[str], list[str]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
    return inputs, outputs


def check_engine_matches(trt, component: Component, engine: "trt.ICudaEngine", path: Path) -> None:
    """BundleError unless the engine's inputs and outputs have the signature's names and ranks."""
    inputs, outputs = _io_names(trt, engine)
    sig = component.signature
    got = {n: len(engine.get_tensor_shape(n)) for n in inputs + outputs}
    want = {t.name: len(t.shape) for t in (*sig.inputs, *sig.outputs)}
    if set(inputs) != set(sig.input_names) or set(outputs) != set(sig.output_names) or got != want:
        raise BundleError(
            f"{path}: plan tensors inputs {sorted(inputs)} outputs {sorted(outputs)} (ranks {got}) do not match"
            f" component {component.name!r} signature inputs {sig.input_names} outputs {sig.output_names} (ranks {want})"
        )


def narrowed_signature(trt, engine: "trt.ICudaEngine", signature: EngineSignature) -> EngineSignature:
    """`signature` with its batch dim's range cut to the largest batch of the engine's profiles (a plan built for
    batch 1 makes the pipeline run CFG as two calls)."""
    first = signature.inputs[0]
    lead = first.shape[0]
    if not isinstance(lead, str):
        return signature
    highest = max(int(engine.get_tensor_profile_shape(first.name, p)[2][0]) for p in range(engine.num_optimization_profiles))
    lo, hi = signature.dim_ranges.get(lead, (1, highest))
    return dataclasses.replace(signature, dim_ranges={**signature.dim_ranges, lead: (lo, min(hi, highest))})


def profile_index(trt, engine: "trt.ICudaEngine", shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The first optimization profile whose min..max holds every input shape, or None."""
    for p in range(engine.num_optimization_profiles):
        fits = True
        for name, shape in shapes.items():
            lo, _, hi = engine.get_tensor_profile_shape(name, p)
            if len(lo) != len(shape) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                fits = False
                break
        if fits:
            return p
    return None


# ---- memory owned by the backend ----------------------------------------------------------------


@dataclass
class PoolMemory:
    """The device buffer behind an `ActivationPool`; `generation` changes whenever it is reallocated."""

    buffer: cuda.DeviceBuffer | None = None
    generation: int = 0


@dataclass
class Binding:
    """One input or output of a loaded engine: its device buffer and host staging buffer, reused across runs."""

    name: str
    is_input: bool
    engine_dtype: str  # DataType member name
    signature_dtype: str
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    device: cuda.DeviceBuffer | None = None
    pinned: cuda.PinnedBuffer | None = None

    def host_view(self) -> np.ndarray | None:
        if self.pinned is None:
            return None
        return self.pinned.array(self.shape, storage_dtype(self.engine_dtype))

    def free(self) -> None:
        for buf in (self.device, self.pinned):
            if buf is not None:
                buf.free()
        self.device = self.pinned = None


class TrtEngine(Engine):
    """One deserialized plan with its execution context, buffers and (optionally) CUDA graph."""

    streams_weights = True

    def __init__(
        self,
        component: Component,
        backend: "TensorRTBackend",
        trt,
        engine: "trt.ICudaEngine",
        context: "trt.IExecutionContext",
        log: LogBook,
        activations: ActivationPool,
        private_pool: bool,
        weight_budget: int | None,
        plan: PlanInfo,
    ) -> None:
        super().__init__(component, activations)
        self._backend = backend
        self._trt = trt
        self._engine: "trt.ICudaEngine" = engine
        self._context: "trt.IExecutionContext" = context
        self._log = log
        self._private_pool = private_pool
        self.plan = plan
        self.gpu_seconds = 0.0
        self.weight_budget = weight_budget
        self._streamable = int(engine.streamable_weights_size)
        self._total_weights = int(engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE))
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._generation = -1
        self._profile = 0
        self._graph: cuda.Graph | None = None
        self._graph_runs = 0
        self.graph_replays = 0
        self.warnings: list[str] = []
        inputs, outputs = _io_names(trt, engine)
        self._signature = narrowed_signature(trt, engine, component.signature)
        sig = {t.name: t.dtype for t in (*component.signature.inputs, *component.signature.outputs)}
        self._bindings = {
            n: Binding(n, n in inputs, engine.get_tensor_dtype(n).name, sig[n]) for n in [*inputs, *outputs]
        }
        self._events = (cuda.Event(), cuda.Event())

    @property
    def signature(self) -> EngineSignature:
        """The component's signature, its batch range narrowed to what the plan's profiles take."""
        return self._signature

    @property
    def resident_bytes(self) -> int:
        return 0 if self.released else self._total_weights - self.streamed_bytes

    @property
    def streamed_bytes(self) -> int:
        if self.released or self.weight_budget is None:
            return 0
        return max(0, self._streamable - self.weight_budget)

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Shapes, profile, activation memory and buffers for a new set of input shapes."""
        trt = self._trt
        ctx = self._context
        engine = self._engine
        stream = self._backend.stream
        stream.synchronize()
        self._drop_graph()
        mark = self._log.mark()
        profile = profile_index(trt, engine, shapes)
        if profile is None:
            raise EngineInputError(f"engine {self.name!r}: input shapes {shapes} are outside every optimization profile of {self.plan.path}")
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, stream.handle):
                raise tensorrt_failure(f"engine {self.name!r}: selecting optimization profile {profile}", self._log.errors_since(mark))
            self._profile = profile
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise EngineInputError(f"engine {self.name!r}: TensorRT refuses input {name!r} of shape {list(shape)}: {self._log.errors_since(mark)[-1:]}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise tensorrt_failure(f"engine {self.name!r}: output shapes for {unresolved}", self._log.errors_since(mark))
        needed = ctx.update_device_memory_size_for_shapes() or engine.get_device_memory_size_for_profile_v2(profile)
        pool = self._backend.ensure_activations(self.activations, int(needed))
        ctx.set_device_memory(pool.buffer.ptr, pool.buffer.nbytes)
        self._generation = pool.generation
        for b in self._bindings.values():
            b.shape = tuple(int(d) for d in ctx.get_tensor_shape(b.name))
            b.nbytes = int(np.prod(b.shape, dtype=np.int64)) * storage_dtype(b.engine_dtype).itemsize
            what = f"{self.name} {'input' if b.is_input else 'output'} {b.name!r}"
            if b.device is None or b.device.nbytes < b.nbytes:
                if b.device is not None:
                    b.device.free()
                b.device = self._backend.allocate(b.nbytes, what)
            staged = b.nbytes <= PINNED_LIMIT_BYTES
            if staged and (b.pinned is None or b.pinned.nbytes < b.nbytes):
                if b.pinned is not None:
                    b.pinned.free()
                b.pinned = self._backend.allocate(b.nbytes, what, pinned=True)
            elif not staged and b.pinned is not None:
                b.pinned.free()
                b.pinned = None
            if not ctx.set_tensor_address(b.name, b.device.ptr):
                raise tensorrt_failure(f"engine {self.name!r}: binding {b.name!r}", self._log.errors_since(mark))
        self._shapes = dict(shapes)
        self._graph_runs = 0

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        pool_memory: PoolMemory = self.activations.handle
        if shapes != self._shapes or pool_memory.generation != self._generation:
            self._bind(shapes)
        stream = self._backend.stream
        keep = []  # pageable sources must live until the stream synchronizes
        for name, value in feeds.items():
            b = self._bindings[name]
            data = to_engine(value, b.engine_dtype)
            view = b.host_view()
            if view is not None:
                np.copyto(view, data.reshape(b.shape))
                cuda.copy_to_device(b.device.ptr, b.pinned, b.nbytes, stream)
            else:
                keep.append(data)
                cuda.copy_to_device(b.device.ptr, data, b.nbytes, stream)
        start, end = self._events
        mark = self._log.mark()
        start.record(stream)
        if self._graph is not None:
            self._graph.launch(stream)
            self.graph_replays += 1
        elif not self._context.execute_async_v3(stream.handle):
            raise tensorrt_failure(f"engine {self.name!r}: execute_async_v3", self._log.errors_since(mark))
        end.record(stream)
        hosts = {}  # name -> (host array, whether it is a reused staging buffer)
        for b in self._bindings.values():
            if b.is_input:
                continue
            view = b.host_view()
            if view is None:
                hosts[b.name] = (np.empty(b.shape, storage_dtype(b.engine_dtype)), False)
                cuda.copy_to_host(hosts[b.name][0], b.device.ptr, b.nbytes, stream)
            else:
                hosts[b.name] = (view, True)
                cuda.copy_to_host(b.pinned, b.device.ptr, b.nbytes, stream)
        stream.synchronize()
        self.gpu_seconds += end.seconds_since(start)
        outputs = {
            n: from_engine(v, self._bindings[n].engine_dtype, self._bindings[n].signature_dtype, copy=staged)
            for n, (v, staged) in hosts.items()
        }
        self._graph_runs += 1
        if self._backend.cuda_graphs and self._graph is None and self._graph_runs == 1:
            self._capture()
        return outputs

    def _capture(self) -> None:
        """Capture `execute_async_v3` at the bound shapes into a CUDA graph; on failure run without one."""
        stream = self._backend.stream
        try:
            self._graph = cuda.capture_graph(stream, lambda: self._context.execute_async_v3(stream.handle))
        except WanrtError as e:
            self._backend.cuda_graphs_failed(self.name, f"{e}; {self._log.errors[-1:]}")

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.destroy()
            self._graph = None

    def _release(self) -> None:
        self._drop_graph()
        self._context = None  # the context goes before the engine; the engine's weights go with it
        self._engine = None
        for b in self._bindings.values():
            b.free()
        for event in self._events:
            event.destroy()
        if self._private_pool:
            self.activations.owners.discard(self.name)
            self._backend.free_activations(self.activations)


class TensorRTBackend(Backend):
    """TensorRT plans on one NVIDIA GPU, through cuda-python; see the module docstring."""

    name = "tensorrt"
    memory_margin_bytes = MARGIN_BYTES
    strict_budget = True

    def __init__(self, device_index: int = 0, cuda_graphs: bool = False, probe: TensorRTProbe | None = None) -> None:
        probe = probe or probe_tensorrt(device_index)
        if probe.problem is not None or probe.device is None:
            raise WanrtError(f"--backend tensorrt: {probe.problem}")
        self.probe = probe
        self.device_info = probe.device
        self.cuda_graphs = cuda_graphs
        self.stream = cuda.Stream()
        self.warnings: list[str] = []
        self._runtimes: dict[str, tuple[Any, Any]] = {}  # module name -> (trt.Runtime, its trt.ILogger)
        self._logs: dict[str, LogBook] = {}

    @property
    def device(self) -> str:
        return f"cuda:{self.device_info.index}"

    def describe(self) -> str:
        runtimes = ", ".join(r.describe() for r in self.probe.runtimes)
        d = self.device_info
        return f"tensorrt ({runtimes}) on {self.device} ({d.name}, compute capability {d.compute_capability})"

    # ---- plans

    def plan_for(self, component: Component) -> tuple[PlanInfo, TensorRTRuntime]:
        plan, rt, why = select_plan(component, self.probe.runtimes, self.device_info.compute_capability)
        if plan is None:
            raise BundleError(f"component {component.name!r} cannot run on TensorRT here: {'; '.join(why)}")
        return plan, rt

    def weight_bytes(self, component: Component, bundle_dir: str | os.PathLike) -> int:
        plan, _ = self.plan_for(component)
        if plan.weights_bytes is not None:
            return plan.weights_bytes
        try:
            return (Path(bundle_dir) / plan.path).stat().st_size
        except OSError:
            raise BundleError(f"{Path(bundle_dir) / plan.path}: missing (plan of component {component.name!r})") from None

    def memory_need(self, component: Component, bundle_dir: str | os.PathLike, inputs: Shapes) -> MemoryNeed:
        plan, _ = self.plan_for(component)
        return need_from_plan(component, plan, self.weight_bytes(component, bundle_dir), inputs)

    # ---- device memory

    def allocate(self, nbytes: int, what: str, pinned: bool = False):
        """A device (or pinned host) buffer; DeviceOutOfMemory with the numbers when memory runs out."""
        try:
            return (cuda.PinnedBuffer if pinned else cuda.DeviceBuffer).allocate(nbytes, what)
        except cuda.CudaOutOfMemory as e:
            raise DeviceOutOfMemory(str(e), e.requested_bytes, e.free_bytes, e.total_bytes) from None

    def allocate_activations(self, components, bundle_dir, size_bytes: int | None = None) -> ActivationPool:
        """The shared activation pool: one cudaMalloc of `size_bytes` now (grown at bind time if an engine needs more)."""
        comps = list(components)
        pool = ActivationPool(self.name, 0, tuple(c.name for c in comps), handle=PoolMemory())
        if size_bytes:
            self.ensure_activations(pool, size_bytes)
        return pool

    def ensure_activations(self, pool: ActivationPool, nbytes: int) -> PoolMemory:
        """The pool's memory, reallocated (after the stream drains) when smaller than `nbytes`."""
        memory: PoolMemory = pool.handle
        if memory.buffer is None or memory.buffer.nbytes < nbytes:
            self.stream.synchronize()
            if memory.buffer is not None:
                memory.buffer.free()
                memory.buffer = None
            memory.buffer = self.allocate(nbytes, f"the activation memory of {', '.join(pool.components)}")
            memory.generation += 1
            pool.size_bytes = memory.buffer.nbytes
        return memory

    def free_activations(self, pool: ActivationPool) -> None:
        super().free_activations(pool)
        memory = pool.handle
        if isinstance(memory, PoolMemory) and memory.buffer is not None:
            self.stream.synchronize()
            memory.buffer.free()
        pool.handle = None

    def memory_info(self) -> MemoryInfo:
        free, total = cuda.memory_info()
        return MemoryInfo(self.device, free, total)

    def default_budget_bytes(self) -> int:
        """All free device memory; the arithmetic keeps `memory_margin_bytes` of it free."""
        return self.memory_info().free_bytes

    def cuda_graphs_failed(self, engine: str, why: str) -> None:
        self.warnings.append(f"{engine}: CUDA graph capture failed, running without a graph ({why})")

    def take_warnings(self) -> list[str]:
        out, self.warnings = self.warnings, []
        return out

    # ---- loading

    def _runtime(self, rt: TensorRTRuntime) -> "trt.Runtime":
        """One `trt.Runtime` per TensorRT module, with its logger and log book, kept for the backend's life."""
        if rt.module_name not in self._runtimes:
            self._logs[rt.module_name] = LogBook()
            self._runtimes[rt.module_name] = open_runtime(rt, self._logs[rt.module_name])
        return self._runtimes[rt.module_name][0]

    def load(
        self,
        component: Component,
        bundle_dir: str | os.PathLike,
        *,
        activations: ActivationPool | None = None,
        weight_budget_bytes: int | None = None,
    ) -> Engine:
        """Deserialize `component`'s plan for this GPU, set its streaming budget, create its context."""
        plan, rt = self.plan_for(component)
        trt = rt.module
        path = Path(bundle_dir) / plan.path
        if not path.is_file():
            raise BundleError(f"{path}: missing (plan of component {component.name!r})")
        runtime: "trt.Runtime" = self._runtime(rt)
        log = self._logs[rt.module_name]
        if plan.version_compatible and not plan.lean_runtime_excluded and rt.kind == "full":
            runtime.engine_host_code_allowed = True  # the plan embeds its lean runtime; verify_bundle checked its sha256
        engine: "trt.ICudaEngine" = deserialize_plan(rt, runtime, log, path, component.name)
        check_engine_matches(trt, component, engine, path)
        if plan.stripped:
            graph = plan.graph or component.onnx
            if not graph:
                raise BundleError(f"{path}: a stripped plan, but component {component.name!r} keeps no ONNX graph to take its weights from")
            from .tensorrt_refit import refit_from_onnx  # the full tensorrt only (runtime_for_plan sends stripped plans there)

            refit_from_onnx(trt, engine, self._runtimes[rt.module_name][1], log, Path(bundle_dir) / graph, component.name)
        budget = apply_weight_budget(engine, log, weight_budget_bytes, path, component.name)
        mark = log.mark()
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise tensorrt_failure(f"creating the execution context of {component.name!r}", log.errors_since(mark))
        private = activations is None
        if private:
            activations = self.allocate_activations([component], bundle_dir)
        activations.owners.add(component.name)
        return TrtEngine(component, self, trt, engine, context, log, activations, private, budget, plan)

    def close(self) -> None:
        self._runtimes.clear()
        self.stream.destroy()


def deserialize_plan(rt: TensorRTRuntime, runtime: "trt.Runtime", log: LogBook, path: Path, name: str) -> "trt.ICudaEngine":
    """The engine in the plan file at `path`, read in pieces; BundleError with TensorRT's error when it cannot."""
    trt = rt.module
    mark = log.mark()
    with open(path, "rb") as file:
        engine = runtime.deserialize_cuda_engine(plan_reader(trt, file))
    if engine is None:
        errors = log.errors_since(mark)
        if any(_OOM.search(e) for e in errors):
            raise tensorrt_failure(f"deserializing {path}", errors)
        raise BundleError(
            f"{path}: {rt.describe()} cannot deserialize the plan of component {name!r}:"
            f" {errors[-1] if errors else 'no error reported'}"
        )
    return engine


def apply_weight_budget(engine: "trt.ICudaEngine", log: LogBook, budget: int | None, path: Path, name: str) -> int | None:
    """Set `weight_streaming_budget_v2` (before any context exists); the budget set, or None when not streaming."""
    if budget is None:
        return None
    streamable = int(engine.streamable_weights_size)
    if streamable <= 0:
        raise BundleError(
            f"{path}: component {name!r} must stream weights to fit the budget, but its plan was built without"
            " WEIGHT_STREAMING (rebuild it with build-engine --target trt, or raise --vram-budget)"
        )
    value = max(0, min(int(budget), streamable))
    mark = log.mark()
    engine.weight_streaming_budget_v2 = value
    errors = log.errors_since(mark)
    if errors:
        raise tensorrt_failure(f"setting the weight-streaming budget of {name!r} to {value} bytes", errors, value)
    return value
