"""`build-engine --quantize fp8 --quantize-attention`: a calibrated tiny Wan2.1 t2v bundle with fp8 self-attention, end to end.

Facts used: the issue (`--quantize-attention` is fp8 only; the attention scales are calibrated on the
real trajectory and recorded with the linears'), tensorrt.md §3/§5 (Q/DQ on q, k^T, v and the softmax
output; ModelOpt rejects INT8 MHA), and our CLI (`--attention native|plugin`; the plugin's own fp8
path is `--attention plugin --attention-precision fp8`).  The fp32 bundle is the baseline; the quantized bundle is
built over a copy of it, so the text encoder and VAE are reused.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from tests.export.helpers import assert_one_line_error, run_cli
from wanrt.calibration.calibrate import CalibrationOptions
from wanrt.engines.manifest import read_manifest, verify_bundle
from wanrt.export.build import BuildOptions, build_bundle, cache_key, plan_components
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.onnx.lint import lint_onnx
from wanrt.export.tiny import make_tiny_model
from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions
from wanrt.runtime.pipeline import WanPipeline
from wanrt.runtime.request import GenerationRequest

PROMPTS = ["a red fox in the snow", "waves on a rocky beach"]
CALIB = ["--calib-steps", "3", "--calib-size", "64x64x5", "--calib-method", "percentile", "--calib-percentile", "99.9"]
HELD_OUT = GenerationRequest(prompt="a lighthouse in a storm", frames=5, height=64, width=64, steps=3, seed=1234)
MIN_PSNR_DB = 25.0  # stated bound on the tiny random model (the measured value is printed)
LAYERS = 2  # the tiny model's blocks: one self-attention each


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model, its fp32 bundle, and the fp8 W8A8 + attention bundle built over a copy of it."""
    root = tmp_path_factory.mktemp("qattn")
    model = make_tiny_model(root / "model", "wan2.1", "t2v", seed=4)
    build_bundle(model, root / "fp32", options=BuildOptions(), log=lambda _msg: None)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = root / "fp8_attention"
    shutil.copytree(root / "fp32", out)
    r = run_cli("build-engine", model, "-o", out, "--quantize", "fp8", "--quantize-attention", "--calib-prompts", prompts,
                *CALIB, "--json")  # fmt: skip
    assert r.exit_code == 0, r.stderr[-3000:]
    return root, model, prompts, out, r


def test_manifest_records_the_attention_scales_the_graph_holds(built):
    root, model, prompts, bundle, r = built
    summary = r.json()
    assert summary["components"]["dit"]["status"] == "built" and summary["components"]["text_encoder"]["status"] == "reused"
    assert f"dit: calibrated {LAYERS * 10} linear inputs and {LAYERS} attentions" in r.stderr
    comp = verify_bundle(bundle).components["dit"]
    act = comp.attributes["quantization"]["activations"]
    att = act["attention"]
    assert att["scheme"] == "fp8" and att["kinds"] == ["self"] and att["softmax_scale"] == pytest.approx(1 / 448)
    assert att["sites"] == LAYERS and len(act["scales"]) == LAYERS * 10  # next to the linears' scales
    assert sorted(att["scales"]) == [f"blocks.{i}.self_attn.attention" for i in range(LAYERS)]
    graph = bundle / comp.onnx
    model_proto = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: float(onnx.numpy_helper.to_array(t)) for t in model_proto.graph.initializer if t.name.endswith("_scale")
             and ".attention." in t.name}  # fmt: skip
    recorded = {f"{site}.{w}_scale": s for site, ws in att["scales"].items() for w, s in ws.items()}
    assert inits == pytest.approx(recorded, rel=1e-6) and len(inits) == 4 * LAYERS
    assert all(0 < s for s in recorded.values())
    assert sum(n.op_type == "QuantizeLinear" for n in model_proto.graph.node) == LAYERS * (10 + 4)
    assert lint_onnx(graph) == []


def test_the_option_is_in_the_cache_key(built):
    """The recorded key is the one of a plan with --quantize-attention; the same build without it has another."""
    root, model, prompts, bundle, _ = built
    resolved = resolve_model(model)
    calib = CalibrationOptions(method="percentile", percentile=99.9, prompts_file=str(prompts), steps=3, size=(64, 64, 5))
    keys = {}
    for attention in (True, False):
        options = BuildOptions(quantize="fp8", quantize_attention=attention, calibration=calib, components=("dit",))
        keys[attention] = cache_key(plan_components(resolved, options, [])[0], [])
    assert read_manifest(bundle).components["dit"].cache_key == keys[True] != keys[False]


def test_the_bundle_runs_close_to_fp32_and_writes_a_video(built, tmp_path):
    root, _, _, bundle, _ = built

    def final_latents(b):
        pipeline = WanPipeline(b, read_manifest(b), OnnxRuntimeBackend(OrtOptions(device="cpu")))
        return pipeline.generate(pipeline.prepare(HELD_OUT), decode=False).latents

    ref, got = final_latents(root / "fp32"), final_latents(bundle)
    db = float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((got - ref) ** 2)))
    print(f"fp8 W8A8 + attention vs fp32 final latents (tiny wan2.1 t2v, 3 steps, held-out prompt/seed): PSNR {db:.1f} dB")
    assert db > MIN_PSNR_DB
    r = run_cli("run", bundle, "--prompt", "a lighthouse", "--frames", "5", "--height", "64", "--width", "64",
                "--steps", "2", "--seed", "3", "-o", tmp_path / "v.mp4")  # fmt: skip
    assert r.exit_code == 0, r.stderr[-2000:]
    assert (tmp_path / "v.mp4").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["--quantize", "int8"], "--quantize-attention needs --quantize fp8 (got --quantize int8)"),
    ([], "--quantize-attention needs --quantize fp8 (got no --quantize)"),
    (["--quantize", "fp8", "--weights-only"], "cannot be combined with --weights-only"),
    (["--quantize", "fp8", "--attention", "plugin"], "--attention-precision fp8"),
])
def test_bad_attention_options(built, tmp_path, args, needle):
    model = built[1]
    assert_one_line_error(["build-engine", model, "-o", tmp_path / "out", "--quantize-attention", *args], needle)
    assert not (tmp_path / "out").exists()
