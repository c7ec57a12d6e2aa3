"""Engines a serving replica keeps loaded between jobs, under the same memory budget as `run`.

`run` loads each stage's engines and releases them after the stage; the DiT experts stay
loaded together only when they fit the budget (`runtime.residency`).  A replica serves many
jobs, so it applies the same policy to the whole bundle: when every component's weights plus
the shared activations fit the budget, `KeepLoaded` keeps each engine from its first load to
the replica's end; otherwise the replica loads per stage exactly as `run` does.
"""

from __future__ import annotations

import os
from typing import Iterable

from wanrt.engines.manifest import Component, Manifest

from ..backends.base import ActivationPool, Backend, Engine, MemoryInfo
from ..memory import MemoryNeed, Shapes


class _Lent(Engine):
    """A kept engine lent to one stage: the stage's release leaves it loaded."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.component, engine.activations)
        self.inner = engine
        self.streams_weights = engine.streams_weights

    @property
    def resident_bytes(self) -> int:
        return self.inner.resident_bytes

    def _run(self, feeds: dict) -> dict:
        return self.inner._run(feeds)  # feeds were checked by Engine.run

    def _release(self) -> None:
        pass


class KeepLoaded(Backend):
    """A backend whose engines (and activation pools) stay loaded until `close`."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend
        self.name = backend.name
        self.memory_margin_bytes = backend.memory_margin_bytes
        self.strict_budget = backend.strict_budget
        self._engines: dict[str, Engine] = {}
        self._pools: dict[tuple[str, ...], ActivationPool] = {}

    @property
    def device(self) -> str:
        return self.inner.device

    @property
    def loaded(self) -> list[str]:
        return list(self._engines)

    def load(self, component: Component, bundle_dir: str | os.PathLike, *, activations: ActivationPool | None = None,
             weight_budget_bytes: int | None = None) -> Engine:  # fmt: skip
        if component.name not in self._engines:
            self._engines[component.name] = self.inner.load(
                component, bundle_dir, activations=activations, weight_budget_bytes=weight_budget_bytes
            )
        return _Lent(self._engines[component.name])

    def allocate_activations(
        self, components: Iterable[Component], bundle_dir: str | os.PathLike, size_bytes: int | None = None
    ) -> ActivationPool:
        comps = list(components)
        key = tuple(sorted(c.name for c in comps))
        pool = self._pools.get(key)
        if pool is None or (size_bytes is not None and pool.size_bytes < size_bytes):
            if pool is not None and not pool.owners:
                self.inner.free_activations(pool)
            pool = self._pools[key] = self.inner.allocate_activations(comps, bundle_dir, size_bytes)
        return pool

    def free_activations(self, pool: ActivationPool) -> None:
        pass  # freed by close()

    def activation_bytes(self, component: Component, bundle_dir: str | os.PathLike) -> int:
        return self.inner.activation_bytes(component, bundle_dir)

    def weight_bytes(self, component: Component, bundle_dir: str | os.PathLike) -> int:
        return self.inner.weight_bytes(component, bundle_dir)

    def memory_need(self, component: Component, bundle_dir: str | os.PathLike, inputs: Shapes) -> MemoryNeed:
        return self.inner.memory_need(component, bundle_dir, inputs)

    def memory_info(self) -> MemoryInfo:
        return self.inner.memory_info()

    def default_budget_bytes(self) -> int:
        return self.inner.default_budget_bytes()

    def take_warnings(self) -> list[str]:
        return self.inner.take_warnings()

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        """Release every kept engine, then the pools."""
        for engine in self._engines.values():
            engine.release()
        self._engines.clear()
        for pool in self._pools.values():
            self.inner.free_activations(pool)
        self._pools.clear()


def keeps_whole_bundle(backend: Backend, manifest: Manifest, bundle: str | os.PathLike, budget_bytes: int | None) -> bool:
    """Whether every component's weights, the largest activation need and the backend's margin fit `budget_bytes`.

    None means no limit.  This is the bundle-wide form of `run`'s keep-both-experts rule
    (`runtime.residency`): a replica that keeps everything never loads twice.
    """
    if budget_bytes is None:
        return True
    comps = list(manifest.components.values())
    activations = max((backend.activation_bytes(c, bundle) for c in comps), default=0)
    weights = sum(backend.weight_bytes(c, bundle) for c in comps)
    return weights + activations + backend.memory_margin_bytes <= budget_bytes


def replica_backend(backend: Backend, manifest: Manifest, bundle: str | os.PathLike, budget_bytes: int | None) -> Backend:
    """`KeepLoaded(backend)` when the whole bundle fits the budget, else `backend` (per-stage loading, as `run`)."""
    return KeepLoaded(backend) if keeps_whole_bundle(backend, manifest, bundle, budget_bytes) else backend
