"""ONNX Runtime backend: runs a bundle's `model.onnx` (+ external `.data`) on CPU, or CUDA when present."""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component

from .base import ActivationPool, Backend, Engine, EngineRunError, MemoryInfo, component_file_bytes

# ONNX tensor type strings as ONNX Runtime reports them -> numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class OrtOptions:
    """Session settings; the defaults suit multi-GB graphs with external weights."""

    device: str = "auto"  # "auto" (CUDA when the provider is present), "cpu", "cuda"
    device_id: int = 0
    intra_op_threads: int = 0  # 0: one per physical core
    optimization: str = "all"  # "disable", "basic", "extended", "all"
    memory_arena: bool = True  # CPU arena for activations (weights bypass it, see below)
    log_level: int = 3  # errors only


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a runtime dependency
        raise WanrtError(f"onnxruntime is not installed ({e}); `pip install onnxruntime` or onnxruntime-gpu") from None
    return onnxruntime


def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA execution provider."""
    return "CUDAExecutionProvider" in _import_ort().get_available_providers()


def _host_memory() -> MemoryInfo:
    """Available/total host RAM from /proc/meminfo (Linux), else sysconf."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return MemoryInfo("cpu", fields["MemAvailable"], fields["MemTotal"])
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo("cpu", os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page)


def _cuda_memory(device_id: int) -> MemoryInfo | None:
    """Free/total device memory through the CUDA runtime library (no torch); None if unavailable."""
    for lib in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        prev = ctypes.c_int()
        cudart.cudaGetDevice(ctypes.byref(prev))
        if cudart.cudaSetDevice(device_id) != 0:
            return None
        err = cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        cudart.cudaSetDevice(prev.value)
        return MemoryInfo(f"cuda:{device_id}", free.value, total.value) if err == 0 else None
    return None


class OrtEngine(Engine):
    """One `onnxruntime.InferenceSession` behind the Engine interface."""

    streams_weights = False

    def __init__(self, component: Component, session, weight_bytes: int, activations: ActivationPool | None) -> None:
        super().__init__(component, activations)
        self._session = session
        self._weight_bytes = weight_bytes
        self._outputs = component.signature.output_names
        self.providers = list(session.get_providers())

    @property
    def resident_bytes(self) -> int:
        return 0 if self.released else self._weight_bytes

    @property
    def session(self):
        """The underlying InferenceSession (None once released)."""
        return self._session

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._outputs, feeds)
        except Exception as e:  # onnxruntime's own exception types
            raise EngineRunError(f"engine {self.name!r} failed in onnxruntime: {describe_ort_failure(e)}") from None
        return dict(zip(self._outputs, values))

    def _release(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU by default, on CUDA when the CUDA provider is installed."""

    name = "onnxruntime"

    def __init__(self, options: OrtOptions = OrtOptions()) -> None:
        ort = _import_ort()
        self.options = options
        if options.device not in ("auto", "cpu", "cuda"):
            raise WanrtError(f"onnxruntime device {options.device!r}; expected 'auto', 'cpu' or 'cuda'")
        has_cuda = cuda_available()
        if options.device == "cuda" and not has_cuda:
            raise WanrtError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {ort.get_available_providers()});"
                " install onnxruntime-gpu or use the CPU"
            )
        self.use_cuda = has_cuda and options.device != "cpu"

    @property
    def device(self) -> str:
        return f"cuda:{self.options.device_id}" if self.use_cuda else "cpu"

    def providers(self) -> list:
        """Execution providers with their options, most preferred first."""
        if not self.use_cuda:
            return ["CPUExecutionProvider"]
        cuda = {
            "device_id": self.options.device_id,
            # Grow the arena by what is asked, not in powers of two: a 14B graph would
            # otherwise reserve far more than it uses.
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": True,
        }
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    def session_options(self):
        """SessionOptions for large graphs: weights outside the arena, quiet logs, threads as configured."""
        ort = _import_ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.optimization]
        so.intra_op_num_threads = self.options.intra_op_threads
        so.enable_cpu_mem_arena = self.options.memory_arena
        so.log_severity_level = self.options.log_level
        # Initializers (the weights) get their own allocations instead of arena chunks, so
        # releasing a session really returns their memory (needed to swap 14B experts).
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        # ORT (1.32, from "extended" on) fuses an int8/fp8 weight DequantizeLinear + MatMul (W8A16) into
        # MatMulNBits, whose default accuracy level 4 quantizes the activations to int8 on the fly: 11% off the
        # graph's math on a tiny umt5.  Level 1 keeps fp32 activations (the fused kernel, the graph's numbers).
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        return so

    def load(
        self,
        component: Component,
        bundle_dir: str | os.PathLike,
        *,
        activations: ActivationPool | None = None,
        weight_budget_bytes: int | None = None,
    ) -> Engine:
        """Create an InferenceSession for `component`; `weight_budget_bytes` is accepted but
        ONNX Runtime cannot stream weights, so every weight stays resident."""
        ort = _import_ort()
        if component.onnx is None:
            raise BundleError(f"component {component.name!r} has no ONNX graph (the bundle was built with --target trt): "
                              "ONNX Runtime cannot run it; run it on TensorRT, or rebuild with --target all")
        path = Path(bundle_dir) / component.onnx
        if not path.is_file():
            raise BundleError(f"{path}: missing (component {component.name!r})")
        weight_bytes = component_file_bytes(component, bundle_dir)
        try:
            session = ort.InferenceSession(str(path), sess_options=self.session_options(), providers=self.providers())
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ""
            if component.precision not in ("fp32", "fp16") and not self.use_cuda:
                hint = f" ({component.precision} engines may need a GPU provider; rebuild with --precision fp32 for the CPU)"
            raise BundleError(f"{path}: onnxruntime cannot load component {component.name!r}: {first}{hint}") from None
        check_session_matches(component, session, path)
        if activations is not None:
            activations.owners.add(component.name)
        return OrtEngine(component, session, weight_bytes, activations)

    def memory_info(self) -> MemoryInfo:
        if self.use_cuda:
            info = _cuda_memory(self.options.device_id)
            if info is not None:
                return info
            warnings.warn(
                "CUDA memory cannot be queried (no loadable libcudart): memory budgets use host memory;"
                " set run --memory-budget to the GPU memory the experts may use",
                stacklevel=2,
            )
        return _host_memory()


def describe_ort_failure(e: Exception) -> str:
    """One line for an onnxruntime run failure; out-of-memory gets the size and a hint."""
    text = " ".join(str(e).split())
    oom = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", text)
    if oom:
        return (
            f"out of memory allocating {int(oom.group(1)) / 2**30:.1f} GiB; use a smaller video"
            " (--height/--width/--frames) or a machine with more memory"
        )
    return text[:500] or type(e).__name__


def check_session_matches(component: Component, session, path: Path) -> None:
    """BundleError unless the graph's inputs/outputs have the names, dtypes and ranks of the signature."""
    sig = component.signature

    def describe(items) -> dict[str, tuple[str, int]]:
        return {i.name: (_ORT_TYPES.get(i.type, i.type), len(i.shape)) for i in items}

    got_in, got_out = describe(session.get_inputs()), describe(session.get_outputs())
    want_in = {t.name: (t.dtype, len(t.shape)) for t in sig.inputs}
    want_out = {t.name: (t.dtype, len(t.shape)) for t in sig.outputs}
    for kind, got, want in (("inputs", got_in, want_in), ("outputs", got_out, want_out)):
        if got != want:
            raise BundleError(
                f"{path}: graph {kind} {_fmt(got)} do not match component {component.name!r} signature {_fmt(want)}"
            )


def _fmt(d: dict[str, tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{n}:{t}/rank{r}" for n, (t, r) in d.items()) + "]"
