"""Inference backends behind one interface: ONNX Runtime (everywhere) and TensorRT plans (NVIDIA GPUs)."""

from __future__ import annotations

from dataclasses import dataclass

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import Manifest

from .base import ActivationPool, Backend, DeviceOutOfMemory, Engine, EngineInputError, EngineRunError, MemoryInfo

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a bundle, and why (reported by `run --json`)."""

    requested: str
    name: str  # "onnxruntime" or "tensorrt"
    reason: str
    plans: dict[str, str]  # TensorRT: component -> "plan path (runtime)"

    def to_dict(self) -> dict:
        return {"requested": self.requested, "chosen": self.name, "reason": self.reason, "plans": self.plans}


def choose_backend(requested: str, manifest: Manifest | None = None, device_index: int = 0, probe=None) -> BackendChoice:
    """`auto`: TensorRT when every component of the bundle has a plan that runs on this GPU with a TensorRT
    runtime that imports, ONNX Runtime otherwise; `tensorrt`: the same checks, failing with the reason."""
    if requested not in BACKENDS:
        raise WanrtError(f"unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "onnxruntime":
        return _onnxruntime(requested, "requested with --backend onnxruntime", manifest)
    if manifest is None or not any(c.plans for c in manifest.components.values()):
        if requested == "tensorrt":
            raise WanrtError("--backend tensorrt: the bundle holds no TensorRT plans (build them with build-engine --target trt)")
        return _onnxruntime(requested, "the bundle holds no TensorRT plans", manifest)
    from .tensorrt import plans_for_bundle, probe_tensorrt

    probe = probe if probe is not None else probe_tensorrt(device_index)
    if probe.problem is not None:
        if requested == "tensorrt":
            raise WanrtError(f"--backend tensorrt: {probe.problem}")
        return _onnxruntime(requested, f"TensorRT cannot run here: {probe.problem}", manifest)
    chosen, problems = plans_for_bundle(manifest, probe)
    if problems:
        if requested == "tensorrt":
            raise WanrtError(f"--backend tensorrt: {problems[0]}")
        return _onnxruntime(requested, f"not every component has a plan for this GPU: {problems[0]}", manifest)
    d = probe.device
    runtimes = sorted({rt.describe() for _, rt in chosen.values()})
    reason = (
        f"every component has a plan for {d.name} (compute capability {d.compute_capability})"
        f" that {', '.join(runtimes)} runs"
    )
    return BackendChoice(requested, "tensorrt", reason, {n: f"{p.path} ({rt.describe()})" for n, (p, rt) in chosen.items()})


def _onnxruntime(requested: str, reason: str, manifest: Manifest | None) -> BackendChoice:
    """ONNX Runtime for `reason`, unless a component has no ONNX graph (a `--target trt` bundle): then a WanrtError."""
    missing = [n for n, c in manifest.components.items() if c.onnx is None] if manifest is not None else []
    if missing:
        raise WanrtError(f"--backend {requested}: {reason}, and component {missing[0]!r} has no ONNX graph for ONNX Runtime"
                         " (the bundle was built with --target trt; rebuild with --target all to run it without TensorRT)")
    return BackendChoice(requested, "onnxruntime", reason, {})


def make_backend(
    name: str = "auto", device: str = "auto", threads: int = 0, device_index: int = 0, cuda_graphs: bool = False
) -> Backend:
    """The backend called `name` ("auto" without a bundle: ONNX Runtime; see `choose_backend`)."""
    if name not in BACKENDS:
        raise WanrtError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(device_index=device_index, cuda_graphs=cuda_graphs)
    from .onnxruntime import OnnxRuntimeBackend, OrtOptions

    return OnnxRuntimeBackend(OrtOptions(device=device, device_id=device_index, intra_op_threads=threads))


__all__ = [
    "ActivationPool", "Backend", "BackendChoice", "DeviceOutOfMemory", "Engine", "EngineInputError", "EngineRunError",
    "MemoryInfo", "BACKENDS", "choose_backend", "make_backend",
]
