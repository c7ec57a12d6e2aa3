"""The backend seam: load an engine from a bundle component, bind inputs, run, release.

Every backend (ONNX Runtime now, TensorRT plans next) implements `Backend` and returns
`Engine`s.  The pipeline only ever talks to these two classes, so adding a backend means
adding one module under `runtime/backends/` and a name in `runtime.backends.BACKENDS`.

Device memory is owned explicitly, in three pieces, so that a TensorRT backend can keep
two 14B experts, their activations and the weight-streaming scratch inside one VRAM budget:

* **Weights** belong to an `Engine` from `load()` until `release()`.  `Engine.resident_bytes`
  says how much of the device (or host, for CPU backends) they occupy right now.
* **Activations** (the scratch an engine needs while it runs) can be owned by an
  `ActivationPool` instead of by each engine: `Backend.allocate_activations(components)`
  sizes one buffer for the largest of the given components and `load(..., activations=pool)`
  makes the engine run inside it.  Engines that share a pool must never run concurrently
  (the pipeline runs them one after the other on one stream).  TensorRT mapping:
  `max(engine.device_memory_size_v2)` -> one `cudaMalloc`, each context created with
  `ExecutionContextAllocationStrategy.USER_MANAGED` and `ctx.set_device_memory(ptr, size)`
  (the demoDiffusion Wan pattern for `transformer` / `transformer_2`).  ONNX Runtime owns
  its own arenas, so its pool only records the owners and an estimate.
* **Weight streaming**: `load(..., weight_budget_bytes=N)` asks the engine to keep at most
  N bytes of weights on the device and stream the rest from host memory each run.
  TensorRT mapping: `engine.weight_streaming_budget_v2 = N` set before the execution
  context is created (plans built with `BuilderFlag.WEIGHT_STREAMING`); `None` means no
  streaming.  Backends that cannot stream report `Engine.streams_weights = False` and keep
  all weights resident; the caller sees that in `resident_bytes`.

When even that does not fit, `runtime.residency.ExpertSwitcher` releases one expert before
loading the other (the residency policy); it uses only the methods below.

How the TensorRT backend (`runtime/backends/tensorrt.py`) fills this interface (tensorrt.md §2, §6):
    load            deserialize the component's plan for this GPU (IStreamReaderV2), set
                    `weight_streaming_budget_v2`, create the context (USER_MANAGED with a pool)
    memory_need     the plan's record: weights, streamable weights, the profile's measured
                    `device_memory_size_v2` (the exact value comes from the context at bind time)
    allocate_activations / free_activations   cudaMalloc / cudaFree of the pool buffer
    Engine.run      `check_feeds`, copy host -> device, `set_input_shape` + `set_tensor_address`,
                    `execute_async_v3`, copy outputs back (latents stay numpy between steps)
    Engine.release  drop context and engine (frees weights); the pool stays with its owner
    memory_info     cudaMemGetInfo
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from wanrt.engines.errors import BundleError, WanrtError
from wanrt.engines.manifest import Component
from wanrt.engines.signatures import EngineSignature, InputMismatch

from ..memory import MemoryNeed, Shapes


class EngineInputError(WanrtError):
    """Feeds that do not match an engine's signature (names, dtypes, shapes, dim ranges)."""


class EngineRunError(WanrtError):
    """An engine failed while running (most often: not enough memory for this video size)."""


class DeviceOutOfMemory(EngineRunError):
    """A device allocation failed; carries the numbers so the caller can name the budget to change."""

    def __init__(self, message: str, requested_bytes: int = 0, free_bytes: int | None = None, total_bytes: int | None = None) -> None:
        super().__init__(message)
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes


@dataclass(frozen=True)
class MemoryInfo:
    """Free and total bytes of the memory a backend's weights live in."""

    device: str  # "cpu", "cuda:0", ...
    free_bytes: int
    total_bytes: int


@dataclass
class ActivationPool:
    """Activation (scratch) memory shared by engines that never run at the same time.

    `size_bytes` is the largest requirement of the components it was sized for;
    `owners` names the loaded engines that run inside it.  A device backend stores its
    buffer handle in `handle` and frees it in `Backend.free_activations`.
    """

    backend: str
    size_bytes: int
    components: tuple[str, ...]
    handle: object | None = None
    owners: set[str] = field(default_factory=set)
    freed: bool = False


def component_file_bytes(component: Component, bundle_dir: str | os.PathLike) -> int:
    """Bytes on disk of a component's files (ONNX graph + external weights)."""
    root = Path(bundle_dir)
    names = set(component.files) | ({component.onnx} if component.onnx is not None else set())
    total = 0
    for rel in names:
        path = root / rel
        try:
            total += path.stat().st_size
        except OSError:
            raise BundleError(f"{path}: missing (component {component.name!r})") from None
    return total


def check_feeds(
    name: str, signature: EngineSignature, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Validate `feeds` against `signature` (`EngineSignature.check_inputs`); return them contiguous, in signature order.

    Raises EngineInputError naming the engine, the input and what was expected.
    """
    for key, value in feeds.items():
        if not isinstance(value, np.ndarray):
            raise EngineInputError(f"engine {name!r}: input {key}: got {type(value).__name__}, expected a numpy array")
    try:
        signature.check_inputs({key: (value.shape, value.dtype.name) for key, value in feeds.items()})
    except InputMismatch as e:
        raise EngineInputError(f"engine {name!r}: {e}") from None
    return {spec.name: np.ascontiguousarray(feeds[spec.name]) for spec in signature.inputs}


class Engine(ABC):
    """One loaded component: bind inputs, run, release."""

    #: False when the engine keeps all weights resident whatever `weight_budget_bytes` says.
    streams_weights: bool = False
    #: Device time inside the engine, summed over runs (CUDA events); None when the backend cannot measure it.
    gpu_seconds: float | None = None

    def __init__(self, component: Component, activations: ActivationPool | None = None) -> None:
        self.component = component
        self.activations = activations
        self.calls = 0
        self.run_seconds = 0.0  # time spent inside `_run` (the engine itself), summed
        self._released = False

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def signature(self) -> EngineSignature:
        return self.component.signature

    @property
    def released(self) -> bool:
        return self._released

    @property
    @abstractmethod
    def resident_bytes(self) -> int:
        """Bytes of weights this engine holds in backend memory now (0 once released)."""

    @property
    def streamed_bytes(self) -> int:
        """Bytes of weights kept in host memory and streamed to the device on every run."""
        return 0

    def bind(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `feeds` against the signature; return them ready for `run`."""
        return check_feeds(self.name, self.signature, feeds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on host arrays; return its outputs by name (float32 host arrays)."""
        if self._released:
            raise RuntimeError(f"engine {self.name!r} was released; load it again")
        bound = self.bind(feeds)
        start = time.perf_counter()
        outputs = self._run(bound)
        self.run_seconds += time.perf_counter() - start
        self.calls += 1
        return outputs

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on validated feeds."""

    def release(self) -> None:
        """Free the engine's weights and detach it from its activation pool; idempotent."""
        if self._released:
            return
        self._release()
        if self.activations is not None:
            self.activations.owners.discard(self.name)
        self._released = True

    @abstractmethod
    def _release(self) -> None:
        """Free backend resources."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Backend(ABC):
    """Loads bundle components as engines and owns the memory they share."""

    name: str = ""
    #: Bytes the residency arithmetic keeps free inside any budget for what it does not count.
    memory_margin_bytes: int = 0
    #: True: a run whose plan does not fit the budget is refused before anything loads (device
    #: backends that stream weights); False: it runs anyway, each expert loaded whole, with a warning.
    strict_budget: bool = False

    @property
    @abstractmethod
    def device(self) -> str:
        """Where engines run: "cpu", "cuda:0", ..."""

    @abstractmethod
    def load(
        self,
        component: Component,
        bundle_dir: str | os.PathLike,
        *,
        activations: ActivationPool | None = None,
        weight_budget_bytes: int | None = None,
    ) -> Engine:
        """Load `component` from `bundle_dir`; BundleError if its files do not match its signature."""

    def allocate_activations(
        self, components: Iterable[Component], bundle_dir: str | os.PathLike, size_bytes: int | None = None
    ) -> ActivationPool:
        """One activation pool big enough for any one of `components` (run one at a time), or of `size_bytes`."""
        comps = list(components)
        if size_bytes is None:
            size_bytes = max((self.activation_bytes(c, bundle_dir) for c in comps), default=0)
        return ActivationPool(self.name, size_bytes, tuple(c.name for c in comps))

    def free_activations(self, pool: ActivationPool) -> None:
        """Free a pool's buffer; engines still attached to it must be released first."""
        if pool.owners:
            raise RuntimeError(f"activation pool still used by {sorted(pool.owners)}; release them first")
        pool.handle = None
        pool.freed = True

    def activation_bytes(self, component: Component, bundle_dir: str | os.PathLike) -> int:
        """Scratch bytes `component` needs while running (0 when the backend cannot tell)."""
        return 0

    def weight_bytes(self, component: Component, bundle_dir: str | os.PathLike) -> int:
        """Bytes of weights `component` occupies once loaded (its file sizes unless overridden)."""
        return component_file_bytes(component, bundle_dir)

    def memory_need(self, component: Component, bundle_dir: str | os.PathLike, inputs: Shapes) -> MemoryNeed:
        """What `component` needs at these input shapes, for the residency arithmetic (`runtime.residency`)."""
        return MemoryNeed(component.name, self.weight_bytes(component, bundle_dir), 0, self.activation_bytes(component, bundle_dir))

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Free/total bytes of the memory engines are loaded into."""

    def default_budget_bytes(self) -> int:
        """The memory budget when the user gives none: 90% of the free memory."""
        return int(self.memory_info().free_bytes * 0.9)

    def close(self) -> None:
        """Free what the backend itself holds (streams, staging buffers); engines are released by their owners."""

    def take_warnings(self) -> list[str]:
        """Warnings the backend collected since the last call (e.g. a CUDA graph it could not capture)."""
        return []

    def describe(self) -> str:
        return f"{self.name} on {self.device}"
