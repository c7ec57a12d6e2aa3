"""Expert residency policy: keep both experts when the budget allows, else release-then-load; on real ORT engines."""

from __future__ import annotations

import numpy as np
import pytest

from wanrt.engines.manifest import read_manifest
from wanrt.runtime.backends import make_backend
from wanrt.runtime.memory import MemoryNeed
from wanrt.runtime.residency import ExpertSwitcher, plan_for_experts, plan_vram
from tests.runtime.bundles import TEXT_DIM, dit_fn

HIGH, LOW = "dit_high_noise", "dit_low_noise"


@pytest.fixture(scope="module")
def bundle(bundle_factory):
    return bundle_factory("moe_big", pad_floats=4096)  # ~16 KB of weights per expert


@pytest.fixture(scope="module")
def sizes(bundle):
    m = read_manifest(bundle)
    return {n: sum((bundle / f).stat().st_size for f in m.components[n].files) for n in m.experts}


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latent": rng.standard_normal((1, 16, 2, 4, 4), dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "context": rng.standard_normal((1, 512, TEXT_DIM), dtype=np.float32),
    }


def need(name, weights, streamable=0, activations=0, io=0, scratch=0):
    return MemoryNeed(name, weights, streamable, activations, io, scratch)


def test_denoise_policy_in_order():
    """keep_all, then swap, then stream (one at a time), then refused; the pool is the larger activation, shared."""
    a, b = need("a", 100, streamable=80, activations=10), need("b", 60, streamable=50, activations=5)
    needs = {"a": a, "b": b}
    assert plan_vram(needs, ["a", "b"], None).mode == "keep_all"
    both = plan_vram(needs, ["a", "b"], 170)  # 100 + 60 + pool 10
    assert both.mode == "keep_all" and both.activation_bytes == 10 and both.fits
    swap = plan_vram(needs, ["a", "b"], 169)
    assert swap.mode == "swap" and swap.weight_budget_bytes == {"a": None, "b": None}  # each fits alone: no streaming
    tight = plan_vram(needs, ["a", "b"], 80)
    # a: 20 fixed + 10 pool = 30, so 50 of its 80 streamable bytes stay; b (60 + 10) fits whole
    assert tight.mode == "stream" and tight.weight_budget_bytes == {"a": 50, "b": None}
    assert tight.streamed_bytes == {"a": 30, "b": 0} and tight.fits
    floor = plan_vram(needs, ["a", "b"], 29)  # a needs at least 20 + 10
    assert not floor.fits and floor.smallest_budget_bytes == 30
    assert "the smallest budget that works is 0.00 GiB" in floor.shortfall()


def test_margin_and_io_count():
    needs = {"a": need("a", 100, activations=10, io=5), "b": need("b", 100, activations=10, io=5)}
    assert plan_vram(needs, ["a", "b"], 230, margin_bytes=10).mode == "keep_all"  # 200 + 10 + 10 + 10
    assert plan_vram(needs, ["a", "b"], 229, margin_bytes=10).mode == "swap"
    nope = plan_vram(needs, ["a", "b"], 124, margin_bytes=10)  # 100 + 5 + 10 + 10, nothing streams
    assert not nope.fits and nope.smallest_budget_bytes == 125


def switcher_for(bundle, budget):
    m = read_manifest(bundle)
    comps = [m.components[n] for n in m.experts]
    backend = make_backend()
    return ExpertSwitcher(backend, bundle, comps, plan_for_experts(backend, bundle, comps, budget))


def check_output(engine, name):
    f = feeds()
    np.testing.assert_allclose(engine.run(f)["noise_pred"], dit_fn(name, 16)(**f), rtol=1e-5, atol=1e-5)


def test_keeps_both_experts_when_they_fit(bundle, sizes):
    sw = switcher_for(bundle, sum(sizes.values()))
    assert sw.plan.keep_all
    high = sw.engine(HIGH)
    low = sw.engine(LOW)
    assert sw.engine(HIGH) is high and sw.resident == [HIGH, LOW]
    check_output(high, HIGH)
    check_output(low, LOW)
    assert [(e.action, e.name) for e in sw.events] == [("load", HIGH), ("load", LOW)]
    assert sw.pool is not None and sw.pool.owners == {HIGH, LOW}
    sw.release_all()
    assert high.released and low.released and sw.resident == [] and sw.pool.freed


def test_releases_one_expert_before_loading_the_other_when_short(bundle, sizes):
    budget = max(sizes.values()) + min(sizes.values()) // 2  # room for one expert, not two
    with switcher_for(bundle, budget) as sw:
        assert sw.plan.mode == "swap" and not sw.warnings
        high = sw.engine(HIGH)
        check_output(high, HIGH)
        assert sw.engine(HIGH) is high  # same expert again: no reload
        low = sw.engine(LOW)
        assert high.released and high.session is None and not low.released
        assert sw.resident == [LOW]
        check_output(low, LOW)
        again = sw.engine(HIGH)  # back again: a fresh load after releasing LOW
        assert low.released and again is not high
        check_output(again, HIGH)
        assert [(e.action, e.name) for e in sw.events] == [
            ("load", HIGH), ("release", HIGH), ("load", LOW), ("release", LOW), ("load", HIGH),
        ]  # fmt: skip
        assert all(len(e.resident_after) <= 1 for e in sw.events)
    assert again.released


def test_expert_larger_than_budget_loads_whole_with_a_warning(bundle, sizes):
    with switcher_for(bundle, min(sizes.values()) // 2) as sw:
        assert not sw.plan.fits and sw.plan.mode == "swap"
        check_output(sw.engine(HIGH), HIGH)
        assert len(sw.warnings) == 1 and "onnxruntime cannot stream weights" in sw.warnings[0]
        with pytest.raises(KeyError, match="no DiT component 'dit'"):
            sw.engine("dit")
