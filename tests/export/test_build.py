"""`build-engine`: complete bundles, cached rebuilds, LoRA records, atomic output, bad input.

Expected components and sampling defaults come from the reference facts (wan-architecture.md
§1-2): a Wan2.2 T2V-A14B model has two experts run high-noise first, a T5 text encoder, the
Wan2.1 VAE (decoder only for t2v), shift 12, boundary 0.875, guide (low 3.0, high 4.0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli import cli
from wanrt.engines.manifest import read_manifest, verify_bundle
from wanrt.export.build import BuildOptions, plan_components
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.onnx.lint import lint_onnx
from wanrt.export.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def moe_build(tmp_path_factory):
    """A tiny Wan2.2 T2V-A14B model and its complete bundle, built once by `python cli.py build-engine` (stderr kept)."""
    root = tmp_path_factory.mktemp("moe")
    env = {**os.environ, "WANRT_CACHE_DIR": str(root / "cache"), "WANRT_GRAPH_CACHE": str(root / "graphs")}  # traced here
    model = make_tiny_model(root / "model", "wan2.2", "t2v", seed=5)
    res = subprocess.run([sys.executable, "cli.py", "build-engine", str(model), "-o", str(root / "bundle"), "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return model, root / "bundle", json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


@pytest.fixture(scope="module")
def moe(moe_build):
    """(model, bundle, --json summary) of `moe_build`."""
    return moe_build[:3]


# What a normal build prints on stderr: our progress lines, notes, and the tqdm bars of the writes.
OUR_STDERR = re.compile(r"\[\d+/\d+\] \w+: (exporting \(.+\)|unchanged, reused)|note: .+|writing model\.onnx: .*|")


def test_a_normal_build_prints_only_our_progress_and_notes(moe_build):
    """No third-party noise (torch.onnx's "torchvision is not installed" lines, axis-name warnings) reaches the user."""
    _, _, summary, stderr = moe_build
    lines = re.split(r"[\r\n]+", stderr)
    assert [line for line in lines if not OUR_STDERR.fullmatch(line)] == []
    progress = [line for line in lines if line.startswith("[")]
    assert progress == [
        "[1/4] dit_high_noise: exporting (fp32)", "[2/4] dit_low_noise: exporting (fp32, graph shared with dit_high_noise)",
        "[3/4] text_encoder: exporting (fp32)", "[4/4] vae_decoder: exporting (fp32)",
    ]  # fmt: skip
    assert set(summary["components"]) == {"dit_high_noise", "dit_low_noise", "text_encoder", "vae_decoder"}


def test_bundle_is_complete_and_verifiable(moe):
    model, bundle, summary = moe
    m = verify_bundle(bundle)
    assert (m.family, m.task) == ("wan2.2", "t2v")
    assert set(m.components) == {"dit_high_noise", "dit_low_noise", "text_encoder", "vae_decoder"}
    assert m.experts == ["dit_high_noise", "dit_low_noise"]
    assert {m.components[n].expert for n in m.experts} == {"high_noise", "low_noise"}
    assert m.sampling.shift == 12.0 and m.sampling.boundary == 0.875 and m.sampling.guide_scale == (3.0, 4.0)
    assert m.vae.version == "2.1" and m.vae.z_dim == 16
    assert (bundle / m.tokenizer / "tokenizer.json").is_file()
    assert summary["components"]["dit_low_noise"]["status"] == "built"
    for comp in m.components.values():
        assert comp.files == sorted([comp.onnx, comp.onnx + ".data"])
        assert lint_onnx(bundle / comp.onnx, comp.signature) == []


def test_dit_engine_runs_with_its_recorded_signature(moe):
    _, bundle, _ = moe
    m = read_manifest(bundle)
    comp = m.components["dit_low_noise"]
    sess = ort.InferenceSession(str(bundle / comp.onnx), providers=["CPUExecutionProvider"])
    sizes = {"batch": 2, "frames": 3, "height": 4, "width": 6}
    rng = np.random.default_rng(0)
    feeds = {
        t.name: rng.standard_normal([sizes.get(d, d) if isinstance(d, str) else d for d in t.shape]).astype(t.dtype)
        for t in comp.signature.inputs
    }
    feeds["timestep"] = np.array([900.0, 10.0], np.float32)
    (out,) = sess.run(None, feeds)
    assert out.shape == (2, m.dit.out_dim, 3, 4, 6) and np.isfinite(out).all()


def test_identical_rebuild_reuses_every_component(moe):
    model, bundle, _ = moe
    before = {p: p.stat().st_ino for p in bundle.rglob("*.data")}
    res = invoke("build-engine", model, "-o", bundle, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert {c["status"] for c in summary["components"].values()} == {"reused"}
    verify_bundle(bundle)
    after = {p: p.stat().st_ino for p in bundle.rglob("*.data")}
    assert before == after  # the same files, hard-linked into the new bundle: nothing was exported again


def test_lora_for_one_expert_rebuilds_only_that_expert(moe, tmp_path):
    model, bundle, _ = moe
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    # a LightX2V-style LoRA on one linear of the low-noise expert (rank 2)
    base = resolve_model(model).expert("low_noise").view["blocks.0.ffn.0.weight"]
    out_f, in_f = base.shape
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(out_f, 2),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, in_f)}, lora)  # fmt: skip
    res = invoke("build-engine", model, "-o", copy, "--lora", f"{lora}:0.5@low_noise", "--json")
    assert res.exit_code == 0, res.output
    status = {n: c["status"] for n, c in json.loads(res.stdout.strip().splitlines()[-1])["components"].items()}
    assert status == {"dit_high_noise": "reused", "dit_low_noise": "built", "text_encoder": "reused", "vae_decoder": "reused"}
    m = verify_bundle(copy)
    (rec,) = m.loras
    assert rec.strength == 0.5 and rec.experts == ["low_noise"]
    import hashlib

    assert rec.sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()


def test_every_component_kind_has_an_exporter_with_the_common_call():
    """(source, out_dir, precision, **options); each takes graph passes and its entry's fixed arguments."""
    import importlib
    import inspect

    from wanrt.engines.manifest import COMPONENT_KINDS
    from wanrt.export.build import EXPORTERS

    assert set(EXPORTERS) == set(COMPONENT_KINDS)
    for kind, exporter in EXPORTERS.items():
        module, attr = exporter.function.split(":")
        params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
        positional = [p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional[1:3] == ["out_dir", "precision"] and {"passes", "progress", *exporter.args} <= set(params), kind


@pytest.mark.parametrize(
    "family, task, expected",
    [
        ("wan2.1", "t2v", {"dit", "text_encoder", "vae_decoder"}),
        ("wan2.1", "i2v", {"dit", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder"}),
        ("wan2.1", "flf2v", {"dit", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder"}),
        ("wan2.2", "i2v", {"dit_high_noise", "dit_low_noise", "text_encoder", "vae_encoder", "vae_decoder"}),
        ("wan2.2", "ti2v", {"dit", "text_encoder", "vae_encoder", "vae_decoder"}),
        ("wan2.1", "vace", {"dit", "text_encoder", "vae_encoder", "vae_decoder"}),  # encodes control video and refs
    ],
)
def test_each_task_plans_the_components_it_needs(tmp_path, family, task, expected):
    model = make_tiny_model(tmp_path / "m", family, task)
    plans = plan_components(resolve_model(model), BuildOptions(), [])
    assert {p.name for p in plans} == expected
    only = plan_components(resolve_model(model), BuildOptions(components=("vae",)), [])
    assert {p.name for p in only} == expected & {"vae_encoder", "vae_decoder"}


def test_bad_inputs_exit_2_with_one_clear_line(moe, tmp_path):
    model, _, _ = moe
    notbundle = tmp_path / "precious"
    notbundle.mkdir()
    (notbundle / "keep.txt").write_text("x")
    cases = [
        (["--precision", "fp64"], "--precision 'fp64'"),
        (["--expert", "mid_noise"], "--expert mid_noise"),
        (["--components", "dit,unet"], "--components: unknown unet"),
        (["--lora", f"{tmp_path / 'nope.safetensors'}"], "nope.safetensors"),
    ]
    for extra, needle in cases:
        res = invoke("build-engine", model, "-o", tmp_path / "out", *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert needle in res.output and "Traceback" not in res.output
        assert not (tmp_path / "out").exists()
    res = invoke("build-engine", model, "-o", notbundle, "--components", "vae")
    assert res.exit_code == 2 and "not a wanrt bundle; refusing to overwrite" in res.output
    assert (notbundle / "keep.txt").exists()


def test_force_replaces_a_folder_that_is_not_a_bundle_and_an_empty_folder_needs_no_force(moe, tmp_path):
    model, _, _ = moe
    notbundle, empty = tmp_path / "precious", tmp_path / "empty"
    notbundle.mkdir()
    empty.mkdir()
    (notbundle / "keep.txt").write_text("x")
    res = invoke("build-engine", model, "-o", notbundle, "--components", "text_encoder", "--force")
    assert res.exit_code == 0, res.output
    assert not (notbundle / "keep.txt").exists()
    assert set(verify_bundle(notbundle).components) == {"text_encoder"}
    res = invoke("build-engine", model, "-o", empty, "--components", "text_encoder", "--json")
    assert res.exit_code == 0, res.output  # `mkdir out` then build into it
    assert set(verify_bundle(empty).components) == {"text_encoder"}


def test_missing_or_mismatched_companions_are_named(tmp_path):
    model = make_tiny_model(tmp_path / "m", "wan2.2", "ti2v")
    (model / "Wan2.2_VAE.pth").unlink()
    res = invoke("build-engine", model, "-o", tmp_path / "b")
    assert res.exit_code == 2 and "no VAE found (expected Wan2.2_VAE.pth beside the model)" in res.output
    assert "the ti2v task needs it" in res.output and "Wan2.1_VAE.pth" not in res.output
    other = make_tiny_model(tmp_path / "m21", "wan2.1", "t2v")
    shutil.copy(other / "Wan2.1_VAE.pth", model / "Wan2.1_VAE.pth")  # 16-channel VAE beside a 48-channel DiT
    res = invoke("build-engine", model, "-o", tmp_path / "b", "--components", "vae")
    assert res.exit_code == 2 and "Wan2.1_VAE.pth" in res.output
    (other / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    res = invoke("build-engine", other, "-o", tmp_path / "b")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "models_t5_umt5-xxl-enc-bf16.pth" in res.output and "the t2v task needs it" in res.output
    assert not (tmp_path / "b").exists()


def test_one_expert_over_an_existing_bundle_keeps_the_other_components(moe, tmp_path):
    """--expert/--components rebuild only what they name; the rest is kept if a full build would reuse it."""
    model, bundle, _ = moe
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    res = invoke("build-engine", model, "-o", copy, "--expert", "low_noise", "--json")
    assert res.exit_code == 0, res.output
    status = {n: c["status"] for n, c in json.loads(res.stdout.strip().splitlines()[-1])["components"].items()}
    assert status == {"dit_high_noise": "kept", "dit_low_noise": "reused", "text_encoder": "reused", "vae_decoder": "reused"}
    assert verify_bundle(copy).experts == ["dit_high_noise", "dit_low_noise"]
    (copy / "dit_high_noise" / "model.onnx.data").write_bytes(b"damaged")  # no longer what a full build would reuse
    res = invoke("build-engine", model, "-o", copy, "--expert", "low_noise", "--components", "dit", "--json")
    assert res.exit_code == 0, res.output
    status = {n: c["status"] for n, c in json.loads(res.stdout.strip().splitlines()[-1])["components"].items()}
    assert status == {"dit_low_noise": "reused", "text_encoder": "kept", "vae_decoder": "kept"}
    assert "dit_high_noise: not requested; the existing one was built from other inputs, so it is dropped" in res.stderr
    verify_bundle(copy)


def test_bf16_build_says_the_vae_stays_fp32(moe, tmp_path):
    model, bundle, _ = moe
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    res = invoke("build-engine", model, "-o", copy, "--precision", "bf16", "--components", "vae", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    note = ("vae_decoder is built in fp32, not bf16: ONNX Conv has no bfloat16 before opset 22, "
            "beyond TensorRT 10.1's ONNX parser (opsets 9-20)")  # fmt: skip
    assert summary["notes"] == [note] and f"note: {note}\n" in res.stderr
    assert summary["precision"] == "bf16" and summary["components"]["vae_decoder"] == {
        "status": "reused", "onnx": "vae_decoder/model.onnx", "precision": "fp32", "plans": []}  # fmt: skip
    assert set(verify_bundle(copy).components) == {"vae_decoder"}  # the fp32 DiT/T5 are not what bf16 builds


def test_a_graph_that_fails_the_lint_fails_the_build(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from wanrt.engines.signatures import EngineSignature, TensorSpec
    from wanrt.engines.errors import WanrtError
    from wanrt.export.build import lint_exported

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "model.onnx")
    sig = EngineSignature((TensorSpec("x", "float64", (2,)),), (TensorSpec("y", "float64", (2,)),))
    with pytest.raises(WanrtError, match=r"dit: the exported graph .*model.onnx fails the TensorRT-compatibility lint: .*Identity on float64"):
        lint_exported("dit", tmp_path / "model.onnx", sig)


def test_interrupted_build_leaves_nothing_behind(moe, tmp_path):
    model, _, _ = moe
    target = tmp_path / "bundle"
    env = {**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache"), "WANRT_GRAPH_CACHE": "0"}  # a build of a minute
    proc = subprocess.Popen([sys.executable, "cli.py", "build-engine", str(model), "-o", str(target)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".bundle.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]  # also when C code dropped the first KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_second_expert_from_the_shared_graph_equals_a_fresh_export(moe, tmp_path, monkeypatch):
    """The low-noise expert was written from the high-noise graph; a fresh trace gives the same bytes."""
    import hashlib

    from wanrt.export.onnx.dit import export_dit_onnx

    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")  # a trace, not the traced-graph cache
    model, bundle, _ = moe
    resolved = resolve_model(model)
    fresh = export_dit_onnx(resolved.expert("low_noise").view, tmp_path / "fresh", cfg=resolved.dit, progress=False)
    m = read_manifest(bundle)
    assert fresh.signature == m.components["dit_low_noise"].signature
    for path in fresh.files:
        rel = f"dit_low_noise/{path.name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == m.files[rel]["sha256"], rel
    high = (bundle / "dit_high_noise" / "model.onnx.data").read_bytes()
    assert high != (bundle / "dit_low_noise" / "model.onnx.data").read_bytes()  # the weights differ


def _run_engine(bundle: Path, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    comp = read_manifest(bundle).components[name]
    sess = ort.InferenceSession(str(bundle / comp.onnx), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_diffusers_folder_builds_the_same_text_encoder_and_vae_as_the_official_layout(moe, tmp_path):
    """text_encoder/ and vae/ of a diffusers folder give the graphs the official .pth files of the same seed give."""
    from wanrt.engines.vae_contract import VAEChunkContract

    _, official, _ = moe  # the official layout, seed 5
    model = make_tiny_model(tmp_path / "diffusers", "wan2.2", "t2v", "diffusers", seed=5)
    bundle = tmp_path / "bundle"
    res = invoke("build-engine", model, "-o", bundle, "--components", "text_encoder,vae")
    assert res.exit_code == 0, res.output
    assert set(verify_bundle(bundle).components) == {"text_encoder", "vae_decoder"}
    assert (bundle / "tokenizer" / "tokenizer.json").read_bytes() == (official / "tokenizer" / "tokenizer.json").read_bytes()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, (2, 9)).astype(np.int64)
    text = {"input_ids": ids, "attention_mask": (np.arange(9)[None] < np.array([[9], [5]])).astype(np.int64)}
    contract = VAEChunkContract.from_attributes(read_manifest(official).components["vae_decoder"].attributes)
    vae = {"latent": rng.standard_normal((1, 16, 1, 3, 4)).astype(np.float32), "first": np.array([True])}
    vae |= {contract.cache_names(i)[0]: np.zeros(contract.cache_shape(i, 3, 4), np.float32) for i in range(len(contract.caches))}
    for name, feeds in (("text_encoder", text), ("vae_decoder", vae)):
        want, got = _run_engine(official, name, feeds), _run_engine(bundle, name, feeds)
        assert len(want) == len(got) and np.abs(want[0]).max() > 0, name
        assert all(np.array_equal(w, g) for w, g in zip(want, got)), name
