"""`build-engine --quantize-text-encoder int8|fp8` end to end, on a tiny Wan2.1 T2V folder that holds only
LightX2V's int8 T5 (`make-tiny-model --quantized-encoders int8`): manifest, cache key, independence from
`--quantize`, `run`, and bad options (exit 2, one line, nothing written)."""

from __future__ import annotations

import shutil

import pytest

from tests.export.helpers import assert_one_line_error, run_cli
from wanrt.engines.manifest import read_manifest, verify_bundle
from wanrt.export.tiny import make_tiny_model

LINEARS = 2 * 7  # tiny umt5: 2 blocks x (attention q, k, v, o + FFN gate.0, fc1, fc2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("te_quant") / "model", "wan2.1", "t2v", seed=2, encoders="int8")


@pytest.fixture(scope="module")
def int8_bundle(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("te_quant_bundle") / "bundle"
    r = run_cli("build-engine", model, "-o", out, "--quantize-text-encoder", "int8", "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    return out, r.json()


def test_manifest_records_the_encoder_quantization(int8_bundle):
    out, summary = int8_bundle
    assert summary["notes"] == []  # the file's own codes pass through: nothing dequantized or requantized
    manifest = read_manifest(out)
    te = manifest.components["text_encoder"]
    assert te.precision == "int8"
    assert te.attributes["quantization"] == {
        "scheme": "int8", "activations": None,
        "weights": {"granularity": "per_channel", "symmetric": True, "axis": 1, "scheme": "int8", "layers": LINEARS,
                    "sources": {"passthrough": LINEARS}},
    }  # fmt: skip
    assert manifest.components["dit"].precision == "fp32" and "quantization" not in manifest.components["dit"].attributes
    verify_bundle(out)


def test_run_writes_a_video(int8_bundle, tmp_path):
    out, _ = int8_bundle
    video = tmp_path / "fox.mp4"
    r = run_cli("run", out, "--prompt", "a red fox in the snow", "--frames", "5", "--height", "64", "--width", "64",
                "--steps", "2", "--seed", "1", "-o", video)  # fmt: skip
    assert r.exit_code == 0, r.stderr[-3000:]
    assert video.stat().st_size > 0


def test_cache_key_covers_it_and_dit_quantize_is_independent(model, int8_bundle, tmp_path):
    src, _ = int8_bundle
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    same = run_cli("build-engine", model, "-o", out, "--quantize-text-encoder", "int8", "--json").json()
    assert {n: c["status"] for n, c in same["components"].items()} == {"dit": "reused", "text_encoder": "reused",
                                                                          "vae_decoder": "reused"}  # fmt: skip
    # --quantize (the DiT) leaves the text encoder's option alone: with it, the int8 encoder is what a full build
    # reuses, so it is kept; without it, a full build would rebuild it in fp32, so it is dropped
    dit = run_cli("build-engine", model, "-o", out, "--components", "dit", "--quantize", "int8", "--weights-only",
                  "--quantize-text-encoder", "int8", "--json")  # fmt: skip
    assert dit.exit_code == 0, dit.stderr[-3000:]
    comps = dit.json()["components"]
    assert (comps["dit"]["status"], comps["dit"]["precision"]) == ("built", "int8")
    assert (comps["text_encoder"]["status"], comps["text_encoder"]["precision"]) == ("kept", "int8")
    assert comps["dit"]["quantization"]["weights"]["layers"] == 2 * 10  # the DiT's own block linears, not the T5's
    plain = run_cli("build-engine", model, "-o", out, "--components", "text_encoder", "--json").json()
    te = plain["components"]["text_encoder"]
    assert (te["status"], te["precision"]) == ("built", "fp32")
    assert any("stores int8 linears; they are dequantized into the fp32 graph" in n for n in plain["notes"])


@pytest.mark.parametrize("args,needles", [
    (["--quantize-text-encoder", "int4"], ["--quantize-text-encoder 'int4'", "int8, fp8"]),
    (["--quantize-text-encoder", "fp8", "--weights-only"], ["--weights-only needs --quantize"]),
])  # fmt: skip
def test_bad_options(model, tmp_path, args, needles):
    out = tmp_path / "bundle"
    assert_one_line_error(["build-engine", model, "-o", out, *args], *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []
