"""Helpers for the bundle-contract tests."""

from __future__ import annotations

from pathlib import Path

from wanrt.engines.defaults import default_sampling
from wanrt.engines.manifest import Component, Manifest, write_manifest
from wanrt.engines.model import DiTConfig, LoraRecord, VAEInfo
from wanrt.engines.signatures import dit_signature


def make_small_bundle(root: Path) -> Manifest:
    """A small but complete bundle with two files per component (contents are arbitrary bytes)."""
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64)
    comps = {}
    for name, expert in (("dit_high_noise", "high_noise"), ("dit_low_noise", "low_noise")):
        (root / name).mkdir(parents=True)
        (root / name / "model.onnx").write_bytes(name.encode() * 10)
        (root / name / "model.onnx.data").write_bytes(bytes(range(256)) * 4)
        comps[name] = Component(
            name, "dit", f"{name}/model.onnx", dit_signature(16, 16, 64), "fp32",
            files=[f"{name}/model.onnx", f"{name}/model.onnx.data"], expert=expert,
        )  # fmt: skip
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    m = Manifest(
        family="wan2.2", task="t2v", dit=cfg, vae=VAEInfo.for_version("2.1"), components=comps,
        sampling=default_sampling("wan2.2", "t2v", moe=True), tokenizer="tokenizer",
        loras=[LoraRecord("x.safetensors", "ab" * 32, 0.5, ["low_noise"])],
    )  # fmt: skip
    write_manifest(root, m)
    return m
