"""Which DiT experts stay loaded: keep both when the memory budget allows, else release-then-load.

Wan2.2 A14B has two 14B experts (high-noise for the first steps, low-noise for the rest).
`ExpertSwitcher` hands the pipeline the engine for a step's expert:

* both experts fit in `budget_bytes` (weights + one shared activation pool): each is loaded
  on first use and kept, so the switch at the boundary costs nothing;
* they do not: the resident expert is released before the other is loaded (the switch
  happens once per generation, at the boundary, since the high-noise steps come first);
* one expert alone does not fit: it is loaded with `weight_budget_bytes` = what is left
  after the activation pool, so a streaming backend (TensorRT) streams the rest of its
  weights; a backend that cannot stream loads it whole and `warnings` says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

from wanrt.engines.manifest import Component

from .backends.base import ActivationPool, Backend, Engine


@dataclass(frozen=True)
class ResidencyEvent:
    """One load or release, in order."""

    action: str  # "load" or "release"
    name: str
    seconds: float
    resident_after: tuple[str, ...]


@dataclass(frozen=True)
class ResidencyPlan:
    """What the policy decided from the sizes and the budget."""

    keep_all: bool
    budget_bytes: int | None
    weight_bytes: dict[str, int]
    activation_bytes: int
    weight_budget_bytes: dict[str, int | None]  # per expert: streaming budget passed to load()

    @property
    def mode(self) -> str:
        return "keep_all" if self.keep_all else "swap"


def plan_residency(
    weight_bytes: dict[str, int], activation_bytes: int, budget_bytes: int | None
) -> ResidencyPlan:
    """Keep every expert when all weights + the shared activations fit `budget_bytes` (None: no limit)."""
    total = sum(weight_bytes.values()) + activation_bytes
    keep_all = budget_bytes is None or total <= budget_bytes
    streaming: dict[str, int | None] = {}
    for name, size in weight_bytes.items():
        if budget_bytes is not None and size + activation_bytes > budget_bytes:
            streaming[name] = max(0, budget_bytes - activation_bytes)
        else:
            streaming[name] = None
    return ResidencyPlan(keep_all, budget_bytes, dict(weight_bytes), activation_bytes, streaming)


class ExpertSwitcher:
    """Loads DiT experts on demand under a memory budget; see the module docstring for the policy."""

    def __init__(
        self,
        backend: Backend,
        bundle_dir: str | os.PathLike,
        components: Sequence[Component],
        budget_bytes: int | None = None,
        share_activations: bool = True,
    ) -> None:
        self.backend = backend
        self.bundle_dir = bundle_dir
        self.components = {c.name: c for c in components}
        self.pool: ActivationPool | None = None
        if share_activations and len(self.components) > 1:
            self.pool = backend.allocate_activations(components, bundle_dir)
        sizes = {c.name: backend.weight_bytes(c, bundle_dir) for c in components}
        self.plan = plan_residency(sizes, self.pool.size_bytes if self.pool else 0, budget_bytes)
        self._engines: dict[str, Engine] = {}
        self.events: list[ResidencyEvent] = []
        self.warnings: list[str] = []

    @property
    def resident(self) -> list[str]:
        """Names of the experts loaded now."""
        return list(self._engines)

    def engine(self, name: str) -> Engine:
        """The engine for expert `name`, loading it (and releasing the other first if the plan says swap)."""
        if name in self._engines:
            return self._engines[name]
        if name not in self.components:
            raise KeyError(f"no DiT component {name!r}; have {sorted(self.components)}")
        if not self.plan.keep_all:
            for other in list(self._engines):
                self._release(other)
        weight_budget = self.plan.weight_budget_bytes[name]
        start = time.perf_counter()
        engine = self.backend.load(
            self.components[name], self.bundle_dir, activations=self.pool, weight_budget_bytes=weight_budget
        )
        self._engines[name] = engine
        self.events.append(ResidencyEvent("load", name, time.perf_counter() - start, tuple(self._engines)))
        if weight_budget is not None and not engine.streams_weights:
            self.warnings.append(
                f"{name}: {self.plan.weight_bytes[name] / 2**30:.2f} GiB of weights exceed the memory budget"
                f" ({self.plan.budget_bytes / 2**30:.2f} GiB) and backend {self.backend.name} cannot stream weights;"
                " loaded whole"
            )
        return engine

    def _release(self, name: str) -> None:
        start = time.perf_counter()
        self._engines.pop(name).release()
        self.events.append(ResidencyEvent("release", name, time.perf_counter() - start, tuple(self._engines)))

    def release_all(self) -> None:
        """Release every loaded expert and the shared activation pool."""
        for name in list(self._engines):
            self._release(name)
        if self.pool is not None and not self.pool.freed:
            self.backend.free_activations(self.pool)

    def __enter__(self) -> "ExpertSwitcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()

    @property
    def loads(self) -> int:
        return sum(e.action == "load" for e in self.events)
