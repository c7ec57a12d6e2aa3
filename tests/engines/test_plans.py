"""engines.plans: which plan runs on which TensorRT and GPU, and plan records in the manifest."""

from __future__ import annotations

import json

import pytest

from wanrt.engines.manifest import MANIFEST_NAME, read_manifest, verify_bundle, write_manifest
from wanrt.engines.plans import (
    PlanInfo, PluginRecord, ProfileShapes, parse_compute_capability, pick_plan, plan_runs_here, profile_for_shapes,
)

from .conftest import make_small_bundle


def plan(**kw) -> PlanInfo:
    base = dict(path="dit/model.plan", tensorrt_version="10.13.3.9", compute_capability="9.0")
    return PlanInfo(**{**base, **kw})


@pytest.mark.parametrize(
    "info,trt,cc,ok,why",
    [
        (plan(), "10.13.3.9", "9.0", True, ""),
        (plan(), "10.13.3.10", "9.0", False, "built with TensorRT 10.13.3.9; this box has TensorRT 10.13.3.10"),
        (plan(), "10.13.3.9", "8.9", False, "built for compute capability 9.0; this GPU is 8.9"),
        (plan(version_compatible=True), "10.16.0.1", "9.0", True, ""),
        (plan(version_compatible=True), "10.8.0.43", "9.0", False, "version-compatible from TensorRT 10.13.3.9 within major version 10"),
        (plan(version_compatible=True), "11.4.0.106", "9.0", False, "within major version 10"),
        (plan(hardware_compatibility="AMPERE_PLUS", compute_capability="8.6"), "10.13.3.9", "12.0", True, ""),
        (plan(hardware_compatibility="AMPERE_PLUS", compute_capability="8.6"), "10.13.3.9", "7.5", False, "8.0 or newer"),
        (plan(hardware_compatibility="SAME_COMPUTE_CAPABILITY"), "10.13.3.9", "9.0", True, ""),
        (
            plan(hardware_compatibility="AMPERE_PLUS", plugin=PluginRecord("WanAttention", "wanrt", "1", "bf16", ["sm_90"])),
            "10.13.3.9", "8.0", False, "embeds WanAttention kernels for sm_90, not sm_80",
        ),
    ],
)
def test_plan_runs_here(info, trt, cc, ok, why):
    got_ok, got_why = plan_runs_here(info, trt, cc)
    assert got_ok is ok and why in got_why


def test_compute_capability_forms():
    assert parse_compute_capability("sm_90a") == (9, 0) == parse_compute_capability("9.0")
    assert parse_compute_capability("sm_100") == (10, 0) and parse_compute_capability("12.1") == (12, 1)


def test_pick_plan_prefers_the_exact_build_and_explains_the_others():
    vc = plan(path="dit/vc.plan", version_compatible=True, tensorrt_version="10.8.0.43")
    exact = plan(path="dit/exact.plan", tensorrt_version="10.13.3.9")
    other_gpu = plan(path="dit/a100.plan", compute_capability="8.0")
    chosen, why = pick_plan([vc, other_gpu, exact], "10.13.3.9", "9.0")
    assert chosen is exact and why == []
    chosen, why = pick_plan([other_gpu], "10.13.3.9", "9.0")
    assert chosen is None and "dit/a100.plan was built for compute capability 8.0" in why[0]


def test_plans_round_trip_through_the_manifest_and_are_verified(tmp_path):
    m = make_small_bundle(tmp_path / "b")
    comp = m.components["dit_low_noise"]
    (tmp_path / "b" / "dit_low_noise" / "model.plan").write_bytes(b"plan bytes")
    comp.plans = [
        plan(
            path="dit_low_noise/model.plan", weight_streaming=True, streamable_weights_bytes=123, refittable=True,
            profiles=[ProfileShapes({"latent": ((1, 16, 1, 2, 2), (1, 16, 21, 60, 104), (2, 16, 21, 90, 160))}, 10 << 20)],
            attention="plugin", plugin=PluginRecord("WanAttention", "wanrt", "1", "fp8", ["sm_90"]),
        )
    ]
    write_manifest(tmp_path / "b", m)
    back = verify_bundle(tmp_path / "b")
    assert back.components["dit_low_noise"].plans == comp.plans
    assert "dit_low_noise/model.plan" in back.files
    (tmp_path / "b" / "dit_low_noise" / "model.plan").write_bytes(b"plan bytez")
    with pytest.raises(Exception, match="model.plan: sha256 mismatch"):
        verify_bundle(tmp_path / "b")


def test_a_malformed_plan_record_names_its_field(tmp_path):
    make_small_bundle(tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    d = json.loads(path.read_text())
    d["components"]["dit_low_noise"]["plans"] = [{"path": "dit_low_noise/x.plan", "tensorrt_version": 11, "compute_capability": "9.0"}]
    path.write_text(json.dumps(d))
    with pytest.raises(Exception, match=r"components.dit_low_noise.plans\[0\].tensorrt_version: expected a string, got an integer 11"):
        read_manifest(tmp_path / "b")


def test_profile_for_shapes_picks_the_first_profile_holding_every_listed_input():
    small = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (1, 16, 21, 60, 104), (1, 16, 21, 60, 104))}, 4 << 30)
    large = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (2, 16, 21, 90, 160), (2, 16, 21, 90, 160))}, 9 << 30)
    info = plan(profiles=[small, large], weights_bytes=28_576_000_000)
    assert profile_for_shapes(info, {"latent": (1, 16, 21, 60, 104), "timestep": (1,)}) is small  # timestep: not listed
    assert profile_for_shapes(info, {"latent": (2, 16, 21, 60, 104)}) is large
    assert profile_for_shapes(info, {"latent": (1, 16, 31, 60, 104)}) is None  # 31 latent frames: above both
    assert profile_for_shapes(info, {"latent": (1, 16, 21, 60)}) is None  # wrong rank
