"""`selftest-trt`: its comparison rule and inputs (here), and the whole self-test where TensorRT and a GPU exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wanrt.engines.manifest import Component
from wanrt.engines.plans import ProfileShapes
from wanrt.engines.signatures import text_encoder_signature
from wanrt.export.trt.selftest import compare, opt_shapes, random_feeds

REPO = Path(__file__).resolve().parents[3]


def test_compare_is_max_error_relative_to_the_reference_scale():
    ref = np.array([[2.0, -4.0], [1.0, 0.5]], np.float32)
    got = ref + np.array([[0.0, 0.02], [-0.01, 0.0]], np.float32)
    v = compare("x", ref, got, 1e-2)
    assert v.passed and abs(v.error - 0.02 / 4.0) < 1e-6  # max |diff| 0.02 over max |ref| 4
    assert not compare("x", ref, ref + 0.05, 1e-2).passed  # 0.05 / 4 = 0.0125 > 1e-2
    assert not compare("x", ref, ref[:1], 1e-2).passed
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert compare("x", ref, nan, 1.0).detail == "1 non-finite values"


def test_inputs_are_at_the_plans_opt_shape_with_valid_token_ids_and_a_full_mask():
    comp = Component("text_encoder", "text_encoder", "t/model.onnx", text_encoder_signature(64), "fp32")
    profile = ProfileShapes({"input_ids": ((1, 1), (2, 512), (2, 512)), "attention_mask": ((1, 1), (2, 512), (2, 512))})
    shapes = opt_shapes(comp, profile)
    assert shapes == {"input_ids": (2, 512), "attention_mask": (2, 512)}
    feeds = random_feeds(comp, shapes, vocab=50)
    assert feeds["input_ids"].dtype == np.int64 and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 50
    assert (feeds["attention_mask"] == 1).all()
    again = random_feeds(comp, shapes, vocab=50)
    assert (again["input_ids"] == feeds["input_ids"]).all()  # seeded: both backends get the same inputs


def tensorrt_and_gpu() -> str | None:
    """Why the real self-test cannot run here (None: it can)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        return f"needs TensorRT's builder (pip install \"wanrt[trt]\"): {str(e).splitlines()[0]}"
    from wanrt.runtime.cuda import no_device_reason

    return no_device_reason()


@pytest.mark.skipif(tensorrt_and_gpu() is not None, reason=str(tensorrt_and_gpu()))
def test_selftest_passes_on_real_tensorrt(tmp_path):
    res = subprocess.run([sys.executable, "cli.py", "selftest-trt", "--keep", str(tmp_path), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    verdicts = json.loads(res.stdout.strip().splitlines()[-1])["verdicts"]
    names = {v["what"].split(".")[0] for v in verdicts}
    assert {"dit_high_noise", "dit_low_noise", "text_encoder", "vae_decoder"} <= names
