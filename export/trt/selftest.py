"""`cli.py selftest-trt`: on a box with TensorRT and a GPU, prove the TensorRT path end to end on the tiny model.

1. write the tiny Wan2.2 T2V-A14B model (two DiT experts, text encoder, VAE decoder) and build it
   with `build-engine --target all` (every DiT expert with WEIGHT_STREAMING);
2. `verify` the bundle (every plan's sha256);
3. run every component on TensorRT and on ONNX Runtime with the same inputs (random, seeded, at
   each plan's opt shape) and compare (`compare`): TensorRT keeps TF32 on for fp32 graphs (its
   builder's default), so fp32 outputs agree to about 1e-3 relative, not bit for bit;
4. a short generation on both backends (same seed, prompt and size), frames compared;
5. a verdict table; exit 1 on any mismatch, 2 when TensorRT or a GPU is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from wanrt.engines.manifest import Component
from wanrt.engines.plans import ProfileShapes

# Tolerances: max |trt - ort| / max(|ort|) per output.  fp32 graphs run with TF32 matmuls/convs in TensorRT (10-bit
# mantissa products, fp32 accumulation); bf16 graphs carry bf16 rounding on both sides in a different order.
REL_TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 2e-2}
VIDEO_TOLERANCE = 8.0  # mean |difference| of the two generations' uint8 frames (0..255)
SELFTEST_SHAPES = {"sizes": "128x128", "frames": "9", "batch": "1-2"}  # small: the run takes seconds per component


@dataclass(frozen=True)
class Verdict:
    """One comparison: what, the measured error, the tolerance, and whether it passed."""

    what: str
    error: float
    tolerance: float
    passed: bool
    detail: str = ""


def compare(what: str, reference: np.ndarray, got: np.ndarray, tolerance: float) -> Verdict:
    """`got` against `reference`: max |got - reference| relative to max |reference| (shape and finiteness first)."""
    if reference.shape != got.shape:
        return Verdict(what, float("inf"), tolerance, False, f"shape {got.shape}, expected {reference.shape}")
    if not np.isfinite(got).all():
        return Verdict(what, float("inf"), tolerance, False, f"{int((~np.isfinite(got)).sum())} non-finite values")
    ref = reference.astype(np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    error = float(np.abs(got.astype(np.float64) - ref).max()) / scale
    return Verdict(what, error, tolerance, error <= tolerance)


def opt_shapes(component: Component, profile: ProfileShapes | None) -> dict[str, tuple[int, ...]]:
    """The shape of every input at the profile's opt point (static inputs as declared)."""
    shapes = {}
    for spec in component.signature.inputs:
        if profile is not None and spec.name in profile.shapes:
            shapes[spec.name] = tuple(profile.shapes[spec.name][1])
        else:
            shapes[spec.name] = tuple(int(d) for d in spec.shape)
    return shapes


def random_feeds(component: Component, shapes: dict[str, tuple[int, ...]], seed: int = 0, vocab: int = 100) -> dict[str, np.ndarray]:
    """Seeded inputs for every input of `component`: N(0, 1) floats, token ids below `vocab`, a full attention mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in component.signature.inputs:
        shape = shapes[spec.name]
        if spec.dtype == "int64":
            feeds[spec.name] = np.ones(shape, np.int64) if "mask" in spec.name else rng.integers(0, vocab, shape, dtype=np.int64)
        elif spec.dtype == "bool":
            feeds[spec.name] = np.ones(shape, bool)
        elif spec.name == "timestep":
            feeds[spec.name] = rng.uniform(0, 1000, shape).astype(np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def compare_components(bundle: Path) -> list[Verdict]:
    """Every component of `bundle` on TensorRT against ONNX Runtime, at its plan's opt shape."""
    from wanrt.engines.manifest import read_manifest
    from wanrt.runtime.backends import make_backend

    manifest = read_manifest(bundle)
    ort_backend, trt_backend = make_backend("onnxruntime"), make_backend("tensorrt")
    verdicts = []
    try:
        for name, comp in manifest.components.items():
            plan, _ = trt_backend.plan_for(comp)
            feeds = random_feeds(comp, opt_shapes(comp, plan.profiles[0] if plan.profiles else None))
            with ort_backend.load(comp, bundle) as engine:
                want = engine.run(feeds)
            with trt_backend.load(comp, bundle) as engine:
                got = engine.run(feeds)
            tolerance = REL_TOLERANCE.get(comp.precision, REL_TOLERANCE["fp32"])
            verdicts += [compare(f"{name}.{out}", want[out], got[out], tolerance) for out in want]
    finally:
        trt_backend.close()
        ort_backend.close()
    return verdicts


def compare_generations(bundle: Path, work: Path) -> Verdict:
    """A 2-step generation on both backends (PNG frames), compared frame by frame."""
    from PIL import Image

    frames = {}
    for backend in ("onnxruntime", "tensorrt"):
        out = work / backend
        res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "cli.py"), "run", str(bundle),
                              "--prompt", "a red fox in the snow", "--steps", "2", "--seed", "7", "--frames", "9",
                              "--height", "128", "--width", "128", "--backend", backend, "-o", str(out / "video.mp4"),
                              "--frames-dir", str(out / "frames")], capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            return Verdict("generation", float("inf"), VIDEO_TOLERANCE, False, f"{backend}: {res.stderr.strip()[-300:]}")
        frames[backend] = np.stack([np.asarray(Image.open(p), np.float64) for p in sorted((out / "frames").glob("*.png"))])
    a, b = frames["onnxruntime"], frames["tensorrt"]
    if a.shape != b.shape:
        return Verdict("generation", float("inf"), VIDEO_TOLERANCE, False, f"frames {b.shape} vs {a.shape}")
    error = float(np.abs(a - b).mean())
    return Verdict("generation (mean |diff| of uint8 frames)", error, VIDEO_TOLERANCE, error <= VIDEO_TOLERANCE)


def run_selftest(work: Path, log) -> list[Verdict]:
    """Steps 1-4 of the module docstring in `work`."""
    from wanrt.engines.manifest import verify_bundle
    from wanrt.export.build import BuildOptions, build_bundle
    from wanrt.export.tiny import make_tiny_model

    from .api import build_gpu, import_tensorrt

    import_tensorrt("selftest-trt")  # both before anything is written: exit 2 naming what is missing
    build_gpu("selftest-trt")
    model = make_tiny_model(work / "model", "wan2.2", "t2v", seed=1)
    bundle = work / "bundle"
    build_bundle(model, bundle, options=BuildOptions(target="all", **SELFTEST_SHAPES), log=log)
    verify_bundle(bundle)
    verdicts = [Verdict("verify (sha256 of every file, plans included)", 0.0, 0.0, True)]
    verdicts += compare_components(bundle)
    verdicts.append(compare_generations(bundle, work / "runs"))
    return verdicts


def verdict_table(verdicts: list[Verdict]) -> str:
    """One line per check: PASS/FAIL, what, error vs tolerance."""
    lines = []
    for v in verdicts:
        lines.append(f"{'PASS' if v.passed else 'FAIL'}  {v.what:<48} {v.error:.3g} <= {v.tolerance:.3g}" + (f"  ({v.detail})" if v.detail else ""))
    return "\n".join(lines)


@click.command("selftest-trt")
@click.option("--keep", type=click.Path(), default=None, help="Keep the model, bundle and runs in this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def selftest_command(keep, as_json):
    """Build the tiny model with TensorRT and check every component against ONNX Runtime (needs TensorRT and a GPU)."""
    log = (lambda msg: click.echo(msg, err=True))
    if keep:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
        verdicts = run_selftest(work, log)
    else:
        with tempfile.TemporaryDirectory(prefix="wanrt-selftest-") as tmp:
            verdicts = run_selftest(Path(tmp), log)
    if as_json:
        click.echo(json.dumps({"passed": all(v.passed for v in verdicts), "verdicts": [asdict(v) for v in verdicts]}))
    else:
        click.echo(verdict_table(verdicts))
    if not all(v.passed for v in verdicts):
        raise SystemExit(1)
