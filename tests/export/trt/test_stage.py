"""Which plans a build keeps, reuses or builds, and what their records say (no TensorRT: no plan is built here).

The rules under test (issue 12): a plan is rebuilt when TensorRT's version, the GPU, the graph or
the options change, and reused otherwise; plans of other GPUs built from the same graph stay in
the bundle; `--target trt` keeps plans only.  Plan files here are plain bytes: these tests check
the bookkeeping around the builder, never that a plan runs.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

from wanrt.engines.manifest import verify_bundle, write_manifest
from wanrt.engines.plans import PluginRecord, graph_digest
from wanrt.export.trt.stage import expected_plan, kept_plans, stage_plans, staged_graph_digest

from .conftest import SHAPE, plan_for, trt_build

def test_the_expected_record_of_a_dit_plan(tmp_path, small_bundle):
    m = small_bundle(tmp_path / "b")
    comp = m.components["dit_low_noise"]
    plan = expected_plan(comp, trt_build(refittable=True, version_compatible=True, opt_level=4), "g" * 64, SHAPE)
    assert plan.path == "dit_low_noise/model.trt11.4.0.106.sm90.plan"
    assert (plan.tensorrt_version, plan.compute_capability, plan.opt_level) == ("11.4.0.106", "9.0", 4)
    assert plan.weight_streaming and plan.refittable and plan.version_compatible and plan.lean_runtime_excluded
    assert not plan.stripped and plan.graph == "dit_low_noise/model.onnx" and plan.onnx_sha256 == "g" * 64
    assert plan.profiles[0].shapes["latent"] == ((1, 16, 21, 60, 60), (2, 16, 21, 60, 104), (2, 16, 21, 104, 104))
    # --target trt keeps no ONNX, so the record names no graph
    assert expected_plan(comp, trt_build(target="trt"), "g" * 64, SHAPE).graph == ""


def test_the_cache_key_changes_with_tensorrt_gpu_graph_options_profiles_and_plugin_only(tmp_path, small_bundle):
    comp = small_bundle(tmp_path / "b").components["dit_high_noise"]
    base = expected_plan(comp, trt_build(), "a" * 64, SHAPE).cache_key
    plugin = PluginRecord("WanAttention", "wanrt", "1", "bf16", ["sm_90"])
    changed = {
        "tensorrt": expected_plan(comp, trt_build(version="11.5.0.1"), "a" * 64, SHAPE),
        "gpu": expected_plan(comp, trt_build(cc="8.9"), "a" * 64, SHAPE),
        "graph": expected_plan(comp, trt_build(), "b" * 64, SHAPE),
        "opt level": expected_plan(comp, trt_build(opt_level=5), "a" * 64, SHAPE),
        "refit": expected_plan(comp, trt_build(refittable=True), "a" * 64, SHAPE),
        "sizes": expected_plan(comp, trt_build(sizes="720p"), "a" * 64, SHAPE),
        "frames": expected_plan(comp, trt_build(frames="41"), "a" * 64, SHAPE),
        "plugin": expected_plan(comp, trt_build(plugin=plugin, attention="plugin", plugin_dir=Path("p")), "a" * 64, SHAPE),
    }
    for what, plan in changed.items():
        assert plan.cache_key != base, what
    same = [expected_plan(comp, trt_build(timing_cache=Path("elsewhere.cache")), "a" * 64, SHAPE),
            expected_plan(comp, trt_build(target="trt"), "a" * 64, SHAPE)]  # fmt: skip
    assert all(p.cache_key == base for p in same)
    assert changed["plugin"].plugin == plugin and changed["plugin"].attention == "plugin"


def test_graph_digest_covers_the_graph_and_its_external_data(tmp_path, small_bundle):
    root = tmp_path / "b"
    comp = small_bundle(root).components["dit_low_noise"]
    expected = graph_digest({"model.onnx": hashlib.sha256(b"gdit_low_noise").hexdigest(),
                             "model.onnx.data": hashlib.sha256(b"g" * 100).hexdigest()})  # fmt: skip
    assert staged_graph_digest(comp, root) == expected
    (root / "dit_low_noise" / "model.onnx.data").write_bytes(b"h" * 100)
    assert staged_graph_digest(comp, root) != expected


def test_plans_of_the_same_graph_are_kept_for_every_gpu_and_others_dropped(tmp_path, small_bundle):
    root = tmp_path / "b"
    first = small_bundle(root)
    graph = staged_graph_digest(first.components["dit_low_noise"], root)
    plans = {"dit_low_noise": [plan_for("dit_low_noise", graph, "9.0"), plan_for("dit_low_noise", graph, "8.9"),
                               plan_for("dit_low_noise", "0" * 64, "8.0")]}  # fmt: skip
    old = small_bundle(root, plans)
    kept = kept_plans(old, root, "dit_low_noise", graph)
    assert [p.compute_capability for p in kept] == ["9.0", "8.9"]
    (root / kept[1].path).write_bytes(b"damaged")
    assert [p.compute_capability for p in kept_plans(old, root, "dit_low_noise", graph)] == ["9.0"]


def test_an_onnx_rebuild_carries_matching_plans_into_the_staged_bundle(tmp_path, small_bundle):
    """`--target onnx` over a bundle with plans: plans of an unchanged graph follow it, those of a changed one are dropped."""
    root, tmp = tmp_path / "b", tmp_path / "staged"
    first = small_bundle(root)
    graphs = {n: staged_graph_digest(c, root) for n, c in first.components.items()}
    old = small_bundle(root, {n: [plan_for(n, g)] for n, g in graphs.items()})
    staged = small_bundle(tmp)  # the same graphs, exported again
    (tmp / "dit_high_noise" / "model.onnx.data").write_bytes(b"new weights")  # ...but one expert changed (a LoRA)
    comps = {n: replace(c, plans=[]) for n, c in staged.components.items()}
    out = stage_plans(None, comps, old, root, tmp, SHAPE, print, shutil.copy2, set(comps))
    assert [p.path for p in out["dit_low_noise"].plans] == ["dit_low_noise/model.trt11.4.0.106.sm90.plan"]
    assert out["dit_high_noise"].plans == []
    assert (tmp / out["dit_low_noise"].plans[0].path).read_bytes() == (root / old.components["dit_low_noise"].plans[0].path).read_bytes()


def test_target_trt_reuses_a_current_plan_and_drops_the_onnx(tmp_path, small_bundle):
    root, tmp = tmp_path / "b", tmp_path / "staged"
    build = trt_build(target="trt")
    first = small_bundle(root)
    current = {n: expected_plan(c, build, staged_graph_digest(c, root), SHAPE) for n, c in first.components.items()}
    old = small_bundle(root, {n: [p] for n, p in current.items()})
    staged = small_bundle(tmp)
    comps = {n: replace(c, plans=[]) for n, c in staged.components.items()}
    logged = []
    out = stage_plans(build, comps, old, root, tmp, SHAPE, logged.append, shutil.copy2, set(comps))
    for name, comp in out.items():
        assert comp.onnx is None and comp.files == [] and comp.plans == [current[name]]
        assert not (tmp / name / "model.onnx").exists() and (tmp / current[name].path).is_file()
    assert all("plan unchanged, reused" in line for line in logged)
    write_manifest(tmp, replace(staged, components=out))
    back = verify_bundle(tmp)
    assert set(back.files) == {p.path for p in current.values()}


def test_a_plan_only_component_is_reused_only_while_its_plan_is_current(tmp_path, small_bundle):
    """`--target trt` again over a plan-only bundle: reused when the plan for this build exists, else its ONNX is exported again."""
    from wanrt.export.trt.stage import has_current_plan

    root = tmp_path / "b"
    comp = small_bundle(root).components["dit_low_noise"]
    build = trt_build(target="trt")
    plan_only = replace(comp, onnx=None, files=[], plans=[expected_plan(comp, build, staged_graph_digest(comp, root), SHAPE)])
    assert has_current_plan(plan_only, build, SHAPE)
    assert not has_current_plan(plan_only, trt_build(target="trt", opt_level=5), SHAPE)
    assert not has_current_plan(plan_only, trt_build(target="trt", cc="8.9"), SHAPE)
