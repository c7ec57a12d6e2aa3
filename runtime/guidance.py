"""Per-step expert choice and classifier-free guidance.

Experts (wan-architecture.md §2, lightx2v-formats.md §3):
* one DiT: it runs every step;
* Wan2.2 A14B: the high-noise expert while `t >= boundary * 1000`, else the low-noise one
  (`t` is the value the DiT receives, Wan's truncated integer timestep);
* distilled MoE (LightX2V `boundary_step_index`): the high-noise expert while `step < index`.

Guidance: `v = v_uncond + g * (v_cond - v_uncond)`, with `g = guide_scale[1]` on the high-noise
expert and `guide_scale[0]` on the low-noise one (`SamplingDefaults.guide_scale` is (low, high));
a single DiT uses `guide_scale[0]` (both entries are equal for single-DiT models).  The
unconditional pass is skipped when `enable_cfg` is false or the step's scale is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import EngineSignature

from .backends.base import Engine


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step runs."""

    index: int
    timestep: float
    expert: str  # DiT component name
    guide_scale: float
    cfg: bool


def choose_expert(
    index: int,
    timestep: float,
    experts: Sequence[str],
    boundary: float | None,
    boundary_step_index: int | None,
) -> str:
    """The DiT component for step `index` at `timestep`; `experts` lists component names, high-noise first."""
    if len(experts) == 1:
        return experts[0]
    if len(experts) != 2:
        raise WanrtError(f"expected 1 or 2 DiT experts, the bundle has {list(experts)}")
    high, low = experts
    if boundary_step_index is not None:
        return high if index < boundary_step_index else low
    if boundary is None:
        raise WanrtError("a two-expert bundle needs sampling.boundary or sampling.boundary_step_index")
    return high if timestep >= boundary * 1000 else low


def plan_steps(
    timesteps: np.ndarray,
    experts: Sequence[str],
    expert_kinds: dict[str, str | None],
    guide_scale: tuple[float, float],
    enable_cfg: bool,
    boundary: float | None = None,
    boundary_step_index: int | None = None,
) -> list[StepPlan]:
    """Expert, guide scale and CFG on/off for every step.

    `expert_kinds` maps component name -> "high_noise" / "low_noise" / None (single DiT).
    """
    plans = []
    for i, t in enumerate(timesteps):
        name = choose_expert(i, float(t), experts, boundary, boundary_step_index)
        scale = float(guide_scale[1] if expert_kinds.get(name) == "high_noise" else guide_scale[0])
        plans.append(StepPlan(i, float(t), name, scale, bool(enable_cfg) and scale != 1.0))
    return plans


def combine_cfg(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """The official guidance combination `uncond + scale * (cond - uncond)`."""
    return uncond + np.float32(scale) * (cond - uncond)


def signature_max_batch(signature: EngineSignature) -> int:
    """Largest batch a signature takes: its first input's leading dim, or the range of that named dim."""
    lead = signature.inputs[0].shape[0]
    if isinstance(lead, int):
        return lead
    lo_hi = signature.dim_ranges.get(lead)
    return lo_hi[1] if lo_hi else 1


def engine_max_batch(engine: Engine) -> int:
    """Largest batch the engine takes (`signature_max_batch` of its signature)."""
    return signature_max_batch(engine.signature)


def pair_static_inputs(
    context: np.ndarray, context_null: np.ndarray, extra: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The batch-2 [cond, uncond] inputs that do not change between steps: contexts and `extra` twice."""
    return {"context": np.concatenate([context, context_null]), **{k: np.concatenate([v, v]) for k, v in (extra or {}).items()}}


def predict_velocity(
    engine: Engine,
    step: StepPlan,
    latent: np.ndarray,
    timestep: np.ndarray,
    context: np.ndarray,
    context_null: np.ndarray | None,
    extra: dict[str, np.ndarray] | None = None,
    paired: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """Guided velocity for one step and the number of engine calls it took.

    `latent` [1, in_dim, F, H, W] (conditioning channels included), `timestep` [1] or [1, F],
    `context` / `context_null` [1, text_len, D], `extra` other batch-1 inputs (`clip_fea`),
    shared by both passes.  With CFG and an engine that takes batch 2, one call runs
    [cond, uncond]; otherwise two calls, conditional first.  `paired` is
    `pair_static_inputs(...)`, built once per run so a step does not copy the contexts again.
    """
    extra = extra or {}
    feeds = {"latent": latent, "timestep": timestep, "context": context, **extra}
    if not step.cfg:
        return engine.run(feeds)["noise_pred"], 1
    if context_null is None:
        raise ValueError("CFG step without a negative context")
    if engine_max_batch(engine) >= 2:
        if paired is None:
            paired = pair_static_inputs(context, context_null, extra)
        batched = {"latent": np.concatenate([latent, latent]), "timestep": np.concatenate([timestep, timestep]), **paired}
        out = engine.run(batched)["noise_pred"]
        return combine_cfg(out[:1], out[1:], step.guide_scale), 1
    cond = engine.run(feeds)["noise_pred"]
    uncond = engine.run({**feeds, "context": context_null})["noise_pred"]
    return combine_cfg(cond, uncond, step.guide_scale), 2
