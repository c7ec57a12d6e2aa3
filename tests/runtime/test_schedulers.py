"""Samplers against their references on the same inputs: diffusers' UniPC / flow Euler, and the
LightX2V step-distill facts (worked example + an independent float64 implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanrt.engines.errors import WanrtError
from wanrt.runtime.guidance import plan_steps
from wanrt.runtime.schedulers import FlowUniPC, distill_schedule, make_sampler, wan_schedule
from tests.runtime.oracles import diffusers_distill, diffusers_euler, diffusers_unipc, official_unshifted_sigmas


def run_both(ours, theirs, shape, seed: int):
    """Drive our sampler and a diffusers scheduler with the same random velocities; return both finals."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x.copy())
    for t in theirs.timesteps:
        v = rng.standard_normal(shape).astype(np.float32)
        xt = theirs.step(torch.from_numpy(v), t, xt, return_dict=False)[0]
        x = ours.step(v, x)
    return x, xt.numpy()


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 1.0), (4, 3.0), (10, 5.0), (40, 12.0), (50, 16.0)])
def test_wan_schedule_matches_diffusers_and_facts(steps, shift):
    ours = wan_schedule(steps, shift)
    theirs = diffusers_unipc(steps, shift)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy().astype(np.float64))
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=0, atol=2e-7)
    # the fact's formula, truncated to int, and a final sigma of 0
    s = official_unshifted_sigmas(steps)
    shifted = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_array_equal(ours.timesteps, np.trunc(shifted * 1000))
    assert ours.sigmas[-1] == 0 and ours.sigmas.dtype == np.float32


@pytest.mark.parametrize("steps,shift,order", [(1, 5.0, 2), (2, 5.0, 2), (5, 3.0, 2), (12, 5.0, 2), (30, 12.0, 2), (8, 5.0, 3)])
def test_unipc_updates_match_diffusers(steps, shift, order):
    ours = FlowUniPC(wan_schedule(steps, shift), order=order)
    x, ref = run_both(ours, diffusers_unipc(steps, shift, order), (1, 4, 3, 4, 6), seed=steps)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (6, 3.0), (25, 12.0)])
def test_euler_matches_diffusers(steps, shift):
    theirs = diffusers_euler(steps, shift)
    ours = make_sampler("euler", steps, shift)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_array_equal(ours.timesteps, np.trunc(theirs.timesteps.numpy().astype(np.float64) + 1e-3))
    x, ref = run_both(ours, theirs, (1, 3, 2, 4, 4), seed=steps)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_distill_schedule_worked_example():
    """lightx2v-formats.md §3: shift 5, [1000, 750, 500, 250] -> timesteps 1000, 937.5, 833.3, 625."""
    s = distill_schedule([1000, 750, 500, 250], 5.0)
    np.testing.assert_allclose(s.timesteps, [1000.0, 937.5, 833.333, 625.0], atol=1e-3)
    np.testing.assert_allclose(s.sigmas, [1.0, 0.9375, 0.833333, 0.625, 0.0], atol=1e-6)


@pytest.mark.parametrize("steps,shift", [([1000, 750, 500, 250], 5.0), ([1000, 500], 3.0), ([999, 800, 600, 400, 200, 1], 8.0)])
def test_distill_updates_match_independent_euler(steps, shift):
    """Independent float64 twin: sigma(t) = s*(t/1000) / (1 + (s-1)*(t/1000)); x <- x + (sigma_next - sigma) v."""
    sampler = make_sampler("distill", len(steps), shift, steps)
    sig = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in steps] + [0.0]
    np.testing.assert_allclose(sampler.timesteps, np.array(sig[:-1]) * 1000, rtol=1e-6)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    ref = x.astype(np.float64)
    for i in range(len(steps)):
        v = rng.standard_normal(x.shape).astype(np.float32)
        x = sampler.step(v, x)
        ref = ref + (sig[i + 1] - sig[i]) * v.astype(np.float64)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    # the last step lands on the x0 prediction: x_T - sigma_T * v
    with pytest.raises(RuntimeError, match="already taken"):
        sampler.step(v, x)


@pytest.mark.parametrize("steps,shift", [([1000, 750, 500, 250], 5.0), ([1000, 500], 3.0), ([999, 800, 600, 400, 200, 1], 8.0)])
def test_distill_matches_diffusers_flow_euler(steps, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift) on sigmas = list / 1000 is the same sampler."""
    theirs = diffusers_distill(steps, shift)
    ours = make_sampler("distill", len(steps), shift, steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=0, atol=2e-7)
    x, ref = run_both(ours, theirs, (1, 4, 2, 3, 5), seed=len(steps))
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_moe_step_split_matches_reference_counts():
    """wan-architecture.md §2: with the default timesteps, T2V-A14B runs about 26 high-noise + 14 low-noise
    steps, I2V-A14B about 15 + 25."""
    kinds = {"hi": "high_noise", "lo": "low_noise"}
    for shift, boundary, high in ((12.0, 0.875, 26), (5.0, 0.900, 15)):
        sched = wan_schedule(40, shift)
        plan = plan_steps(sched.timesteps, ["hi", "lo"], kinds, (3.0, 4.0), True, boundary=boundary)
        assert sum(p.expert == "hi" for p in plan) == high
        # high-noise steps come first and use guide_scale[1]
        experts = [p.expert for p in plan]
        assert experts == ["hi"] * high + ["lo"] * (40 - high)
        assert {p.guide_scale for p in plan if p.expert == "hi"} == {4.0}


def test_sampler_errors():
    with pytest.raises(WanrtError, match="unknown sampler"):
        make_sampler("ddim", 4, 5.0)
    with pytest.raises(WanrtError, match="denoising_step_list"):
        make_sampler("distill", 4, 5.0)
    with pytest.raises(WanrtError, match="1..1000"):
        make_sampler("distill", 2, 5.0, [1000, 0])
    with pytest.raises(WanrtError, match="steps=0"):
        make_sampler("unipc", 0, 5.0)
