"""Expert residency policy: keep both experts when the budget allows, else release-then-load; on real ORT engines."""

from __future__ import annotations

import numpy as np
import pytest

from wanrt.engines.manifest import read_manifest
from wanrt.runtime.backends import make_backend
from wanrt.runtime.residency import ExpertSwitcher, plan_residency
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


def test_plan_residency_rules():
    sizes = {"a": 100, "b": 60}
    assert plan_residency(sizes, 10, None).keep_all
    assert plan_residency(sizes, 10, 170).keep_all
    swap = plan_residency(sizes, 10, 169)
    assert not swap.keep_all and swap.mode == "swap"
    assert swap.weight_budget_bytes == {"a": None, "b": None}  # each fits alone: no streaming
    tight = plan_residency(sizes, 10, 80)
    assert tight.weight_budget_bytes == {"a": 70, "b": None}  # "a" alone exceeds: stream within what is left


def switcher_for(bundle, budget):
    m = read_manifest(bundle)
    return ExpertSwitcher(make_backend(), bundle, [m.components[n] for n in m.experts], budget)


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
        assert sw.plan.weight_budget_bytes[HIGH] is not None
        check_output(sw.engine(HIGH), HIGH)
        assert len(sw.warnings) == 1 and "cannot stream weights" in sw.warnings[0]
        with pytest.raises(KeyError, match="no DiT component 'dit'"):
            sw.engine("dit")
