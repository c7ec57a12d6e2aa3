"""Inference backends behind one interface (ONNX Runtime now, TensorRT plans next)."""

from __future__ import annotations

from wanrt.engines.errors import WanrtError

from .base import ActivationPool, Backend, Engine, EngineInputError, EngineRunError, MemoryInfo

BACKENDS = ("auto", "onnxruntime")


def make_backend(name: str = "auto", device: str = "auto", threads: int = 0) -> Backend:
    """The backend called `name`; "auto" picks the best one installed (ONNX Runtime for now)."""
    if name not in BACKENDS:
        raise WanrtError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    from .onnxruntime import OnnxRuntimeBackend, OrtOptions

    return OnnxRuntimeBackend(OrtOptions(device=device, intra_op_threads=threads))


__all__ = [
    "ActivationPool", "Backend", "Engine", "EngineInputError", "EngineRunError", "MemoryInfo", "BACKENDS", "make_backend",
]
