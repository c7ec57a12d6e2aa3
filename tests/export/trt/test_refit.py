"""`refit` bookkeeping: which plans can take a LoRA, the bundle's LoRA arguments, stripped plans' records.

Refitting a non-stripped plan needs TensorRT and a GPU (`selftest-trt`, the GPU tests); a
stripped plan holds no weights, so its refit is a copy with a new record, which runs here.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from tests.export.helpers import assert_one_line_error
from wanrt.engines.model import LoraRecord
from wanrt.export.lora import parse_lora_arg
from wanrt.export.trt.refit import (
    RefitError,
    RefitSession,
    check_plans_here,
    check_unchanged,
    previous_lora_args,
    refit_targets,
)
from wanrt.export.trt.stage import expected_plan, stage_plans, staged_graph_digest

from .conftest import SHAPE, plan_for, trt_build


def test_previous_lora_args_parse_back_to_the_records(tmp_path, small_bundle):
    m = small_bundle(tmp_path / "b")
    m = replace(m, loras=[LoraRecord("/l/a.safetensors", "a" * 64, 0.75, ["low_noise"]),
                          LoraRecord("/l/b.safetensors", "b" * 64, 1.0, []),
                          LoraRecord("/l/from_config.safetensors", "c" * 64, 0.5, [], alpha=8.0)])  # fmt: skip
    args = previous_lora_args(m, config_paths={"/l/from_config.safetensors"})
    parsed = [parse_lora_arg(a) for a in args]
    assert [(str(p.path), p.strength, p.expert) for p in parsed] == [("/l/a.safetensors", 0.75, "low_noise"),
                                                                     ("/l/b.safetensors", 1.0, None)]  # fmt: skip


def test_a_lora_file_that_changed_since_the_build_is_refused():
    records = [LoraRecord("/l/a.safetensors", "a" * 64)]
    check_unchanged(records, {"/l/a.safetensors": "a" * 64})
    with pytest.raises(RefitError, match="has changed since the bundle was built"):
        check_unchanged(records, {"/l/a.safetensors": "f" * 64})
    with pytest.raises(RefitError, match="is gone"):
        check_unchanged(records, {})


def test_refit_targets_need_refittable_plans_and_the_onnx(tmp_path, small_bundle):
    refittable = {n: [plan_for(n, "g" * 64, refittable=True)] for n in ("dit_high_noise", "dit_low_noise")}
    m = small_bundle(tmp_path / "ok", refittable)
    assert refit_targets(m, [None]) == ["dit_high_noise", "dit_low_noise"]
    assert refit_targets(m, ["low_noise"]) == ["dit_low_noise"]
    plain = small_bundle(tmp_path / "plain", {"dit_low_noise": [plan_for("dit_low_noise", "g" * 64)]})
    with pytest.raises(RefitError, match=r"dit_low_noise/model.trt11.4.0.106.sm90.plan is not refittable; rebuild .*--refittable"):
        refit_targets(plain, ["low_noise"])
    with pytest.raises(RefitError, match="dit_high_noise: no TensorRT plan is not refittable"):
        refit_targets(plain, ["high_noise"])
    no_onnx = replace(m, components={n: replace(c, onnx=None, files=[]) for n, c in m.components.items()})
    with pytest.raises(RefitError, match="keeps no ONNX graph to refit from"):
        refit_targets(no_onnx, [None])


def test_refit_needs_this_machines_plan_before_anything_changes(tmp_path, small_bundle):
    plans = {"dit_low_noise": [plan_for("dit_low_noise", "g" * 64, "8.9", refittable=True)]}
    m = small_bundle(tmp_path / "b", plans)
    check_plans_here(m, ["dit_low_noise"], "model.trt11.4.0.106.sm89.plan")
    with pytest.raises(RefitError, match=r"dit_low_noise: no refittable plan for this GPU and TensorRT \(model.trt11.4.0.106.sm90.plan\); "
                                         r"the bundle has model.trt11.4.0.106.sm89.plan"):  # fmt: skip
        check_plans_here(m, ["dit_low_noise"], "model.trt11.4.0.106.sm90.plan")


def test_a_stripped_plan_is_refitted_by_a_new_record_that_a_rebuild_would_reuse(tmp_path, small_bundle):
    """After `refit`, `build-engine` with the same options finds the plan current (same cache key as a fresh build)."""
    root, tmp = tmp_path / "b", tmp_path / "staged"
    build = trt_build(refittable=True, strip_plan=True)
    first = small_bundle(root)
    plans = {n: [expected_plan(c, build, staged_graph_digest(c, root), SHAPE)] for n, c in first.components.items()}
    old = small_bundle(root, plans)
    staged = small_bundle(tmp, seed=b"L")  # the LoRA-merged graphs: other weights
    comps = {n: replace(c, plans=[]) for n, c in staged.components.items()}
    session = RefitSession(None, None, None, build.tensorrt_version, build.compute_capability)  # a stripped plan needs no TensorRT
    out = stage_plans(None, comps, old, root, tmp, SHAPE, print, shutil.copy2, {"dit_low_noise"}, refit=session)
    (plan,) = out["dit_low_noise"].plans
    new_graph = staged_graph_digest(comps["dit_low_noise"], tmp)
    assert plan.onnx_sha256 == new_graph != plans["dit_low_noise"][0].onnx_sha256
    assert plan.cache_key == expected_plan(comps["dit_low_noise"], build, new_graph, SHAPE).cache_key
    assert (tmp / plan.path).read_bytes() == (root / plan.path).read_bytes()
    assert out["dit_high_noise"].plans == []  # not requested: its plan of the old graph cannot follow the new one


def test_refit_cli_names_the_plan_that_is_not_refittable(tmp_path, small_bundle):
    small_bundle(tmp_path / "b", {"dit_low_noise": [plan_for("dit_low_noise", "g" * 64)]})
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"0")
    assert_one_line_error(["refit", tmp_path / "b", "--lora", f"{lora}@low_noise"], "dit_low_noise", "is not refittable")
