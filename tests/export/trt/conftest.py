"""Helpers for the TensorRT-build tests: a small on-disk bundle (ONNX-like files, plan files as bytes), a build without a builder."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanrt.engines.defaults import default_sampling
from wanrt.engines.manifest import Component, Manifest, read_manifest, write_manifest
from wanrt.engines.model import DiTConfig, VAEInfo
from wanrt.engines.plans import PlanInfo
from wanrt.engines.signatures import dit_signature
from wanrt.export.trt.config import TrtOptions
from wanrt.export.trt.profiles import shape_request
from wanrt.export.trt.stage import ModelShape, TrtBuild


def write_small_bundle(root: Path, plans: dict[str, list] | None = None, seed: bytes = b"g") -> Manifest:
    """Two experts, each `model.onnx` + `model.onnx.data` (arbitrary bytes) and the given plans (their files written)."""
    comps = {}
    for name, expert in (("dit_high_noise", "high_noise"), ("dit_low_noise", "low_noise")):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "model.onnx").write_bytes(seed + name.encode())
        (root / name / "model.onnx.data").write_bytes(seed * 100)
        for plan in (plans or {}).get(name, []):
            (root / plan.path).write_bytes(b"plan of " + plan.path.encode())
        comps[name] = Component(name, "dit", f"{name}/model.onnx", dit_signature(16, 16, 64), "fp32",
                                files=[f"{name}/model.onnx", f"{name}/model.onnx.data"], expert=expert,
                                plans=list((plans or {}).get(name, [])))  # fmt: skip
    cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1, in_dim=16, out_dim=16, text_dim=64)
    m = Manifest(family="wan2.2", task="t2v", dit=cfg, vae=VAEInfo.for_version("2.1"), components=comps,
                 sampling=default_sampling("wan2.2", "t2v", moe=True))  # fmt: skip
    write_manifest(root, m)
    return read_manifest(root)


@pytest.fixture
def small_bundle():
    return write_small_bundle


SHAPE = ModelShape((4, 8, 8), cfg=True, task="t2v")


def trt_build(target="all", version="11.4.0.106", cc="9.0", sizes="480p", frames="81", plugin=None, **options) -> TrtBuild:
    request = shape_request((4, 8, 8), sizes, frames, "1-2", None, (480, 832), 81)
    return TrtBuild(target, TrtOptions(**options), request, version, cc, Path("timing.cache"), plugin=plugin)


def plan_for(comp_name: str, graph: str, cc: str = "9.0", **kw) -> PlanInfo:
    return PlanInfo(f"{comp_name}/model.trt11.4.0.106.sm{cc.replace('.', '')}.plan", "11.4.0.106", cc, onnx_sha256=graph, **kw)
