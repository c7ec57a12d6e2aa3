"""The W8A8 checks (`build-engine --quantize int8|fp8`, calibrated) of every single-expert task's tiny model, end
to end: Wan2.1 T2V-1.3B, FLF2V and VACE, Wan2.2 TI2V-5B and Animate, each run by its own test file
(tests/calibration/test_w8a8_<task>.py, so that pytest-xdist spreads them over its workers); Wan2.2 A14B's two
experts: tests/export/test_build_quantize.py; I2V at graph level: tests/calibration/test_qdq.py.

Each variant's fp32 bundle is built once, then one W8A8 bundle over a copy of it (the text encoder,
CLIP and VAE are reused), in one code format per variant (int8: t2v, ti2v, VACE; fp8: flf2v,
Animate), so both formats run through each kind of calibration input while the suite builds one
quantized bundle per variant (the weight and activation passes are the same for every variant;
the A14B test runs both formats).  Calibration runs the bundle's own pipeline with synthetic
conditioning (`calibration.calibrate.TASK_INPUTS`: flf2v a first and last frame, ti2v a first
frame on every second prompt, VACE a control video, mask and reference image, Animate pose and
face videos, a reference image, replace mode on every second prompt).  The held-out run uses
another prompt, seed and other synthetic input files; its DiT inputs are recorded from the fp32
bundle's run and fed to every graph.  References, independent of the code under test: the ONNX
Q/DQ spec (the torch twin in `w8a8_checks`), our torch DiT modules (tested against diffusers),
the fp32 graph.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.calibration.w8a8_checks import (
    FLIP_FRACTION, INPUT_DRIFT, FeedRecorder, cosine, fake_quantize_module, psnr, quantized_layers, rel_l2, session,
    twin_agreement,
)
from tests.export.helpers import run_cli
from wanrt.calibration.calibrate import (
    CalibrationError, CalibrationOptions, calibrate_bundle, calibration_image, calibration_video, synthetic_frames,
    synthetic_mask,
)
from wanrt.engines.manifest import read_manifest, verify_bundle
from wanrt.export.build import BuildOptions, build_bundle
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.models.wan_animate import load_animate_dit
from wanrt.export.models.wan_dit import load_dit, view_config
from wanrt.export.tiny import make_tiny_model
from wanrt.runtime.animate import pipeline_class
from wanrt.runtime.request import GenerationRequest

VARIANTS = {  # task -> (family, W8A8 scheme built)
    "t2v": ("wan2.1", "int8"), "flf2v": ("wan2.1", "fp8"), "ti2v": ("wan2.2", "int8"),
    "vace": ("wan2.1", "int8"), "animate": ("wan2.2", "fp8"),
}  # fmt: skip
CALIB_PROMPTS = ["a red fox in the snow", "a dancer on a stage, spotlights"]  # two: Animate calibrates both modes
SIZE, FRAMES, STEPS = (64, 64), 5, 2
# Stated bounds on the tiny random models (2 sampling steps, held-out prompt, seed and inputs); measured values print.
# Per DiT call vs the fp32 graph: int8 W8A8 on ORT's fused kernel may lose a few percent on CPUs without VNNI
# (README), fp8 e4m3 keeps 3 mantissa bits (relative step 2^-4 per value); the per-call errors of 50+ quantized
# linears add up in quadrature to a few percent.
MAX_REL_L2 = {"int8": 0.1, "fp8": 0.1}
MIN_COSINE = 0.995
# The whole DiT against the torch fake-quantized module: float32 differences of 1e-6 between ORT and torch move an
# activation across a rounding boundary now and then (a one-code flip: 1/127 of the range for int8, 1/16 of the value
# for fp8 e4m3), and each flip's error is re-quantized by every later linear, so across the 60-odd quantized linears of
# these DiTs the outputs part by 2e-3 to 1.3e-2 (measured) although every single linear agrees to 3e-7.  With the
# activation codes aligned (each linear fed the graph's codes) nothing is carried forward and the whole DiT agrees
# within 1e-3; the twin's own input to each linear then differs from the graph's by float32 noise only (INPUT_DRIFT,
# FLIP_FRACTION in w8a8_checks).
END_TO_END = {"int8": 3e-2, "fp8": 3e-2}
MIN_PSNR_DB = 25.0  # final latents after two steps, the same seed as the fp32 bundle


@dataclass
class Variant:
    task: str
    scheme: str  # the quantized bundle's scheme
    model: Path
    bundles: dict[str, Path]  # "fp32" and the scheme
    held_out: GenerationRequest
    feeds: list[dict[str, np.ndarray]]  # the fp32 DiT's inputs at every held-out call


def held_out_request(task: str, folder: Path) -> GenerationRequest:
    """A request unlike any calibration one: another prompt and seed, input files from other seeds."""
    folder.mkdir(exist_ok=True)
    w, h = SIZE
    request = GenerationRequest(prompt="a lighthouse in a storm", frames=FRAMES, steps=STEPS, seed=1234)
    if task in ("t2v", "flf2v", "ti2v"):  # (VACE and Animate take the size of their videos)
        request.height, request.width = h, w
    if task in ("flf2v", "ti2v"):
        request.image = calibration_image(folder / "first.png", 501, w, h)
        if task == "flf2v":
            request.last_image = calibration_image(folder / "last.png", 502, w, h)
    elif task == "vace":
        request.video = calibration_video(folder / "video.mp4", synthetic_frames(501, FRAMES, w, h), 16)
        request.mask = calibration_video(folder / "mask.mp4", synthetic_mask(502, FRAMES, w, h), 16)
        request.ref_images = [calibration_image(folder / "ref.png", 503, w, h)]
    elif task == "animate":
        face = 32  # the tiny motion encoder's face crops (checked by the pipeline against the engine)
        request.pose_video = calibration_video(folder / "pose.mp4", synthetic_frames(501, FRAMES, w, h), 16)
        request.face_video = calibration_video(folder / "face.mp4", synthetic_frames(502, FRAMES, face, face), 16)
        request.image = calibration_image(folder / "ref.png", 503, w, h)
    return request


def generate(bundle: Path, request: GenerationRequest, backend=None):
    manifest = read_manifest(bundle)
    backend = backend or FeedRecorder([])
    pipeline = pipeline_class(manifest.task)(bundle, manifest, backend)
    return pipeline.generate(pipeline.prepare(request), decode=False)


def variant_fixture(task: str):
    """The module-scoped `variant` fixture of one task's test file."""

    @pytest.fixture(scope="module")
    def variant(tmp_path_factory) -> Variant:
        return built_variant(task, tmp_path_factory.mktemp(f"w8a8_{task}"))

    return variant


def built_variant(task: str, root: Path) -> Variant:
    """The task's tiny model, its fp32 bundle, its W8A8 bundle and the held-out run's DiT inputs, under `root`."""
    family, scheme = VARIANTS[task]
    model = make_tiny_model(root / "model", family, task, seed=5)
    bundles = {"fp32": root / "fp32"}
    build_bundle(model, bundles["fp32"], options=BuildOptions(), log=lambda _msg: None)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(CALIB_PROMPTS) + "\n", encoding="utf-8")
    calib = CalibrationOptions(prompts_file=str(prompts), steps=STEPS, size=(*SIZE, FRAMES))
    bundles[scheme] = root / scheme
    shutil.copytree(bundles["fp32"], bundles[scheme])
    build_bundle(model, bundles[scheme], options=BuildOptions(quantize=scheme, calibration=calib), log=lambda _msg: None)
    held_out = held_out_request(task, root / "held_out")
    recorder = FeedRecorder(["dit"])
    generate(bundles["fp32"], held_out, recorder)
    return Variant(task, scheme, model, bundles, held_out, recorder.feeds["dit"])


def dit_graph(v: Variant, which: str) -> Path:
    return v.bundles[which] / read_manifest(v.bundles[which]).components["dit"].onnx


def torch_dit(v: Variant):
    view = resolve_model(v.model).experts[0].view
    cfg = view_config(view)
    return load_animate_dit(view, cfg) if cfg.animate is not None else load_dit(view, cfg)


def test_calibration_ran_the_variant_and_the_graph_holds_its_scales(variant):
    scheme = variant.scheme
    manifest = verify_bundle(variant.bundles[scheme])
    comp = manifest.components["dit"]
    act = comp.attributes["quantization"]["activations"]
    layers = quantized_layers(variant.bundles[scheme] / comp.onnx)
    assert comp.precision == scheme and act["calls"] == len(CALIB_PROMPTS) * STEPS  # no CFG: one call per step
    assert sorted(act["scales"]) == sorted(layers) and all(s > 0 for s in act["scales"].values())
    if variant.task == "vace":  # the VACE blocks' linears (and before_proj / after_proj) are quantized too
        assert any(l.startswith("vace_blocks.0.before_proj") for l in layers)
    model = onnx.load(str(variant.bundles[scheme] / comp.onnx), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(layers)


def test_graph_equals_the_torch_fake_quantized_module(variant):
    """ORT (node semantics kept) on held-out inputs vs torch with the graph's codes and scales: every quantized linear
    (fed the graph's own input) within 1e-3 relative; the whole DiT within 1e-3 with the activation codes aligned
    (each linear fed the graph's own codes, the twin's own input to it within INPUT_DRIFT of the graph's and its own
    rounding flipping at most FLIP_FRACTION of the codes), and within END_TO_END of the twin left to round on its own."""
    scheme = variant.scheme
    graph = dit_graph(variant, scheme)
    module = fake_quantize_module(torch_dit(variant), graph, scheme)
    for feeds in (variant.feeds[0], variant.feeds[-1]):
        twin = twin_agreement(graph, module, feeds, scheme)
        print(f"{variant.task} {scheme}: {twin.describe()}")
        layers = twin.layers
        assert len(layers) == len(quantized_layers(graph)) and max(layers.values()) < 1e-3, max(layers.items(), key=lambda kv: kv[1])
        assert twin.aligned < 1e-3, (variant.task, scheme, twin.aligned)
        assert twin.drift < INPUT_DRIFT and twin.flips <= FLIP_FRACTION * twin.codes, (twin.drift, twin.flips)
        assert twin.unaligned < END_TO_END[scheme], (variant.task, scheme, twin.unaligned)


def test_held_out_output_stays_close_to_fp32(variant):
    """Every held-out DiT call, as the runtime runs the graph (int8 fused), against the fp32 graph."""
    scheme = variant.scheme
    q, ref = session(dit_graph(variant, scheme)), session(dit_graph(variant, "fp32"))
    errs, coss = [], []
    for feeds in variant.feeds:
        got, want = q.run(None, feeds)[0], ref.run(None, feeds)[0]
        errs.append(rel_l2(got, want))
        coss.append(cosine(got, want))
    print(f"{variant.task} {scheme} W8A8 dit vs fp32 graph, {len(errs)} held-out calls: rel L2 max {max(errs):.2e}"
          f" mean {np.mean(errs):.2e}, cosine min {min(coss):.6f}")
    assert max(errs) < MAX_REL_L2[scheme] and min(coss) > MIN_COSINE


def test_ort_fuses_every_int8_matmul(variant, tmp_path):
    """int8 variants only (ONNX Runtime has no fused fp8 MatMul on the CPU: it runs the dequantized graph)."""
    assert variant.scheme == "int8", variant.scheme
    graph = dit_graph(variant, "int8")
    session(graph, optimized=tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == len(quantized_layers(graph)), ops


def test_run_writes_a_video_and_final_latents_stay_close(variant, tmp_path):
    scheme = variant.scheme
    ref = generate(variant.bundles["fp32"], variant.held_out).latents
    got = generate(variant.bundles[scheme], variant.held_out).latents
    db = psnr(got, ref)
    print(f"{variant.task} {scheme} W8A8 vs fp32 final latents ({STEPS} steps, held-out prompt/seed/inputs): PSNR {db:.1f} dB")
    assert db > MIN_PSNR_DB
    h = variant.held_out
    options = {"image": "--image", "last_image": "--last-image", "video": "--video", "mask": "--mask",
               "pose_video": "--pose-video", "face_video": "--face-video"}  # the held-out request's files, as `run` takes them
    inputs = [arg for field, flag in options.items() if getattr(h, field) is not None for arg in (flag, getattr(h, field))]
    inputs += [arg for ref in h.ref_images or () for arg in ("--ref-image", ref)]
    if h.height is not None:
        inputs += ["--height", str(h.height), "--width", str(h.width)]
    out = tmp_path / "v.mp4"
    r = run_cli("run", variant.bundles[scheme], "--prompt", "a lighthouse", *inputs, "--frames", "5", "--steps", "2",
                "--seed", "3", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0


def test_a_component_without_linears_is_a_clear_error(variant, tmp_path):
    """Calibrating a graph with no quantized linears (here the fp32 DiT and the VAE decoder) names it; nothing is rewritten."""
    bundle = variant.bundles["fp32"]
    manifest = read_manifest(bundle)
    before = (bundle / manifest.components["vae_decoder"].onnx).read_bytes()
    for name in ("dit", "vae_decoder"):
        with pytest.raises(CalibrationError, match=f"{name}: .* has no quantized linears to calibrate"):
            calibrate_bundle(bundle, manifest, [name], "int8", CalibrationOptions(), progress=False)
    assert (bundle / manifest.components["vae_decoder"].onnx).read_bytes() == before
    assert not list(bundle.rglob("calibration.onnx"))


def checks_for(task: str) -> dict[str, object]:
    """The module-level names of `task`'s test file: its `variant` fixture and the checks its scheme takes."""
    checks = [
        test_calibration_ran_the_variant_and_the_graph_holds_its_scales, test_graph_equals_the_torch_fake_quantized_module,
        test_held_out_output_stays_close_to_fp32, test_run_writes_a_video_and_final_latents_stay_close,
        test_a_component_without_linears_is_a_clear_error,
    ]  # fmt: skip
    if VARIANTS[task][1] == "int8":
        checks.append(test_ort_fuses_every_int8_matmul)
    return {"variant": variant_fixture(task)} | {check.__name__: check for check in checks}
