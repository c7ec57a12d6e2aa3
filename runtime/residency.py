"""Device-memory budget arithmetic, and which DiT experts stay loaded within it.

The pipeline runs its stages one after another, each loading its engines and releasing them
before the next (the text encoder is released after encoding, as LightX2V's lazy load does):

    text_encoder -> image_encoder -> vae_encoder -> denoise (the DiT experts) -> vae_decoder

so a budget holds when every stage fits it on its own.  `plan_vram` decides, from each
component's `runtime.memory.MemoryNeed` and a margin kept free for what the arithmetic does not
count (TensorRT's own allocations, allocator slack):

* a stage with one engine: resident when weights + activations + I/O + margin fit; else, if the
  plan can stream weights, it streams the rest (`weight_budget_bytes` = what fits of its
  streamable weights); else it does not fit;
* the denoise stage (one or two experts sharing ONE activation pool, the largest of theirs):
  1. `keep_all`: both experts resident (for one DiT: resident);
  2. `swap`: one expert resident at a time; the high-noise expert is released before the
     low-noise one loads (once per generation: the high-noise steps come first);
  3. `stream`: one expert at a time, each streaming the weights that do not fit
     (TensorRT `weight_streaming_budget_v2`, set before its context is created);
  4. otherwise it does not fit.
* `smallest_budget_bytes` is the smallest budget under which every stage fits (streaming as
  much as the plans allow); a budget below it is an error that names it.

The streaming budgets are our own arithmetic in bytes (Python ints): TensorRT's
`get_weight_streaming_automatic_budget` is never called (its binding returns an int32, which
overflows above 2 GiB; tensorrt.md §2).

`ExpertSwitcher` carries out the denoise stage's decision on a backend.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import Component

from .backends.base import ActivationPool, Backend, Engine
from .memory import MemoryNeed

GIB = 1 << 30
MODES = ("keep_all", "swap", "stream")
BEFORE_DENOISE = ("text_encoder", "image_encoder", "vae_encoder")  # stages that run before the DiT, in order


class VramBudgetError(WanrtError):
    """The run cannot fit the device-memory budget, even streaming weights."""


def gib(n: int | None) -> str:
    return "none" if n is None else f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class StageBudget:
    """One stage under the plan: the bytes it peaks at, the least it could take, and how."""

    name: str
    components: tuple[str, ...]
    mode: str  # "keep_all" / "swap" / "stream" for denoise; "resident" / "stream" for one-engine stages
    peak_bytes: int  # margin included
    floor_bytes: int  # the smallest budget this stage fits (streaming all it can), margin included
    fits: bool


@dataclass(frozen=True)
class VramPlan:
    """The residency decision for a run, with the numbers it came from."""

    budget_bytes: int | None
    margin_bytes: int
    mode: str  # the denoise stage's: one of MODES
    experts: tuple[str, ...]
    activation_bytes: int  # the denoise stage's shared activation pool (streaming scratch included)
    weight_budget_bytes: dict[str, int | None]  # per component: streaming budget for load() (None: resident)
    streamed_bytes: dict[str, int]  # per component: weights that stay in host memory and stream each run
    stages: tuple[StageBudget, ...]
    needs: dict[str, MemoryNeed]

    @property
    def keep_all(self) -> bool:
        return self.mode == "keep_all"

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def smallest_budget_bytes(self) -> int:
        return max((s.floor_bytes for s in self.stages), default=self.margin_bytes)

    @property
    def weight_bytes(self) -> dict[str, int]:
        return {n: need.weight_bytes for n, need in self.needs.items()}

    def shortfall(self) -> str:
        """One line: what does not fit, by how much, and the smallest budget that works."""
        bad = [s for s in self.stages if not s.fits]
        worst = max(bad, key=lambda s: s.floor_bytes) if bad else None
        what = f"stage {worst.name} ({', '.join(worst.components)}) needs at least {gib(worst.floor_bytes)}" if worst else ""
        tiling = " or --vae-tiling" if worst is not None and worst.name.startswith("vae_") else ""
        return (
            f"the device-memory budget {gib(self.budget_bytes)} is too small: {what}"
            f" (weights, activations, I/O and a {gib(self.margin_bytes)} margin, streaming every weight the plans can);"
            f" the smallest budget that works is {gib(self.smallest_budget_bytes)}: raise --vram-budget,"
            f" use a smaller video (--height/--width/--frames){tiling}, or a GPU with more memory"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "margin_bytes": self.margin_bytes,
            "mode": self.mode,
            "activation_pool_bytes": self.activation_bytes,
            "smallest_budget_bytes": self.smallest_budget_bytes,
            "fits": self.fits,
            "weight_streaming_budget_bytes": self.weight_budget_bytes,
            "streamed_bytes": self.streamed_bytes,
            "stages": [asdict(s) for s in self.stages],
            "components": {n: asdict(need) for n, need in self.needs.items()},
        }


def _activations(need: MemoryNeed) -> int:
    return int(need.activation_bytes or 0)


def _streaming_budget(budget: int, fixed: int, streamable: int) -> int | None:
    """Streamable bytes that fit beside `fixed` bytes (None when even none fit), below `streamable`."""
    room = budget - fixed
    return None if room < 0 else min(room, streamable)


def _single_stage(need: MemoryNeed, budget: int | None, margin: int) -> tuple[StageBudget, int | None, int]:
    """(stage, streaming budget or None, streamed bytes) for a stage that loads one engine."""
    resident = need.weight_bytes + _activations(need) + need.io_bytes + margin
    fixed = need.fixed_bytes + _activations(need) + need.streaming_scratch_bytes + need.io_bytes + margin
    floor = fixed if need.streamable_bytes > 0 else resident
    floor = min(floor, resident)
    if budget is None or resident <= budget:
        return StageBudget(need.name, (need.name,), "resident", resident, floor, True), None, 0
    if need.streamable_bytes > 0:
        ws = _streaming_budget(budget, fixed, need.streamable_bytes)
        if ws is not None:
            return StageBudget(need.name, (need.name,), "stream", fixed + ws, floor, True), ws, need.streamable_bytes - ws
    return StageBudget(need.name, (need.name,), "resident", resident, floor, False), None, 0


def _denoise_stage(
    needs: Sequence[MemoryNeed], budget: int | None, margin: int
) -> tuple[StageBudget, int, dict[str, int | None], dict[str, int]]:
    """(stage, shared activation pool bytes, streaming budgets, streamed bytes) for the DiT experts."""
    names = tuple(n.name for n in needs)
    pool = max(_activations(n) for n in needs)
    both = sum(n.weight_bytes + n.io_bytes for n in needs) + pool + margin
    one = max(n.weight_bytes + n.io_bytes for n in needs) + pool + margin
    pool_streaming = pool + max(n.streaming_scratch_bytes for n in needs)
    fixed = {n.name: n.fixed_bytes + n.io_bytes + pool_streaming + margin for n in needs}
    floors = [fixed[n.name] if n.streamable_bytes > 0 else n.weight_bytes + n.io_bytes + pool + margin for n in needs]
    floor = min(max(floors), one)
    resident: dict[str, int | None] = {n: None for n in names}
    if budget is None or both <= budget:
        return StageBudget("denoise", names, "keep_all", both, floor, True), pool, resident, {n: 0 for n in names}
    if one <= budget:
        return StageBudget("denoise", names, "swap", one, floor, True), pool, resident, {n: 0 for n in names}
    ws_budgets: dict[str, int | None] = {}
    streamed: dict[str, int] = {}
    peak = 0
    for n in needs:
        alone = n.weight_bytes + n.io_bytes + pool + margin
        if alone <= budget:  # this expert fits whole (the other streams)
            ws_budgets[n.name], streamed[n.name] = None, 0
            peak = max(peak, alone)
            continue
        ws = _streaming_budget(budget, fixed[n.name], n.streamable_bytes) if n.streamable_bytes > 0 else None
        if ws is None:
            return StageBudget("denoise", names, "swap", one, floor, False), pool, resident, {m: 0 for m in names}
        ws_budgets[n.name], streamed[n.name] = ws, n.streamable_bytes - ws
        peak = max(peak, fixed[n.name] + ws)
    return StageBudget("denoise", names, "stream", peak, floor, True), pool_streaming, ws_budgets, streamed


def plan_vram(
    needs: Mapping[str, MemoryNeed], experts: Sequence[str], budget_bytes: int | None, margin_bytes: int = 0
) -> VramPlan:
    """The residency decision for a run: see the module docstring for the policy.

    `needs` holds every component the run loads (stage order: text encoder, image encoder,
    VAE encoder, the `experts`, VAE decoder); `budget_bytes` None means no limit.
    """
    missing = [n for n in experts if n not in needs]
    if missing or not experts:
        raise ValueError(f"plan_vram: experts {list(experts)} must be among the needs {sorted(needs)}")
    stages: list[StageBudget] = []
    ws: dict[str, int | None] = {}
    streamed: dict[str, int] = {}
    others = [n for n in needs if n not in experts]
    before = [n for n in BEFORE_DENOISE if n in others]
    after = [n for n in others if n not in before]
    for name in before:
        stage, ws[name], streamed[name] = _single_stage(needs[name], budget_bytes, margin_bytes)
        stages.append(stage)
    stage, pool, dit_ws, dit_streamed = _denoise_stage([needs[n] for n in experts], budget_bytes, margin_bytes)
    stages.append(stage)
    ws.update(dit_ws)
    streamed.update(dit_streamed)
    for name in after:
        stage, ws[name], streamed[name] = _single_stage(needs[name], budget_bytes, margin_bytes)
        stages.append(stage)
    mode = stages[len(before)].mode
    return VramPlan(
        budget_bytes, margin_bytes, mode, tuple(experts), pool, ws, streamed, tuple(stages), dict(needs)
    )


def plan_for_experts(
    backend: Backend, bundle_dir: str | os.PathLike, components: Sequence[Component], budget_bytes: int | None
) -> VramPlan:
    """The denoise stage alone, from what the backend knows without run shapes (weights; activations if it can tell)."""
    needs = {c.name: backend.memory_need(c, bundle_dir, {}).with_estimate(0) for c in components}
    return plan_vram(needs, [c.name for c in components], budget_bytes, backend.memory_margin_bytes)


@dataclass(frozen=True)
class ResidencyEvent:
    """One load or release, in order."""

    action: str  # "load" or "release"
    name: str
    seconds: float
    resident_after: tuple[str, ...]


class ExpertSwitcher:
    """Loads DiT experts on demand as a `VramPlan` decided: both kept, or one at a time (streaming or not)."""

    def __init__(
        self,
        backend: Backend,
        bundle_dir: str | os.PathLike,
        components: Sequence[Component],
        plan: VramPlan | None = None,
        share_activations: bool = True,
    ) -> None:
        self.backend = backend
        self.bundle_dir = bundle_dir
        self.components = {c.name: c for c in components}
        self.plan = plan if plan is not None else plan_for_experts(backend, bundle_dir, components, None)
        self.pool: ActivationPool | None = None
        if share_activations and len(self.components) > 1:
            # sized now only from measured activations (not while streaming, whose scratch is estimated): otherwise
            # the first engine to run sizes it exactly and a larger one grows it
            known = plan.mode != "stream" and all(plan.needs[n].activation_source != "estimate" for n in self.components)
            self.pool = backend.allocate_activations(components, bundle_dir, size_bytes=plan.activation_bytes if known else None)
        self._engines: dict[str, Engine] = {}
        self.events: list[ResidencyEvent] = []
        self.warnings: list[str] = []
        if not plan.fits:
            self.warnings.append(
                f"{plan.shortfall()}; backend {backend.name} cannot stream weights, so each expert is loaded whole"
                " one at a time"
            )

    @property
    def resident(self) -> list[str]:
        """Names of the experts loaded now."""
        return list(self._engines)

    def engine(self, name: str) -> Engine:
        """The engine for expert `name`, loading it (and releasing the other first unless the plan keeps both)."""
        if name in self._engines:
            return self._engines[name]
        if name not in self.components:
            raise KeyError(f"no DiT component {name!r}; have {sorted(self.components)}")
        if not self.plan.keep_all:
            for other in list(self._engines):
                self._release(other)
        weight_budget = self.plan.weight_budget_bytes.get(name)
        start = time.perf_counter()
        engine = self.backend.load(
            self.components[name], self.bundle_dir, activations=self.pool, weight_budget_bytes=weight_budget
        )
        self._engines[name] = engine
        self.events.append(ResidencyEvent("load", name, time.perf_counter() - start, tuple(self._engines)))
        if weight_budget is not None and not engine.streams_weights:
            self.warnings.append(
                f"{name}: {self.plan.weight_bytes[name] / GIB:.2f} GiB of weights exceed the memory budget"
                f" ({gib(self.plan.budget_bytes)}) and backend {self.backend.name} cannot stream weights; loaded whole"
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
