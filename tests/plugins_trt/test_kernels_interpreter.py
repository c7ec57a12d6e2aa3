"""Our Triton kernel, run by `run_attention` in Triton's CPU interpreter, against the numpy definition.

Shapes: odd sequence lengths, Sq != Sk (cross-attention), Sq = 1, Sk past the smoothing sample
(MEAN_ROWS), 1-3 heads, batch 1-2, head sizes 64 and 128, tiles small enough that every case runs
full K tiles and the masked partial one (one case has no partial tile).  Relative error
= ||out - ref|| / ||ref|| over the whole output; ref = `reference.attention` (float64) on the
inputs as the dtype holds them.  Stated tolerances:

- fp32 inputs 1e-5 (the interpreter's fp32 dot is exact; on a GPU fp32 inputs run tf32);
- fp16 inputs 2e-3 (P is rounded to fp16 for P @ V);
- bf16 inputs 1.5e-2: Triton's interpreter multiplies raw bf16 storage in `tl.dot`, so the kernel,
  told it is interpreted, runs its bf16 dots on float32 copies of the bf16 values (exact products,
  as on tensor cores); the interpreter also truncates float32 -> bf16 where the GPU rounds, which
  roughly doubles the rounding error of P (GPU-measured errors are in bench/RESULTS.md);
- fp8 QK^T 8e-2 and int8 QK^T 3e-2 against the exact result (the formats' own error on standard
  normal data, see reference.py's tests), and 2e-3 (fp16 inputs) / 1.5e-2 (bf16) against
  `reference.quantized_attention`, the same quantization written in numpy: that is what shows the
  kernel smooths and scales as specified rather than merely landing near the answer.  In the
  interpreter fp8 values are rounded to the e4m3 grid in float32 before the cast (its own
  float-to-fp8 conversion drops the mantissa carry); the fp8 dot itself is the interpreter's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from wanrt.engines.errors import WanrtError
from wanrt.plugins_trt.kernels import MEAN_ROWS
from wanrt.plugins_trt.reference import attention, quantized_attention

REPO = Path(__file__).resolve().parents[2]
ROUND = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
EXACT_TOL = {("bf16", "fp32"): 1e-5, ("bf16", "fp16"): 2e-3, ("bf16", "bf16"): 1.5e-2}
QUANT_TOL = {"fp8": 8e-2, "int8": 3e-2}
MODEL_TOL = {"fp16": 2e-3, "bf16": 1.5e-2}

# name: (precision, dtype, (B, heads, Sq, Sk, head_dim), scale, (block_m, block_n), K bias)
CASES = {
    "fp32_odd": ("bf16", "fp32", (2, 3, 37, 53, 64), 0.125, (16, 16), 0.0),
    "fp32_whole_tiles": ("bf16", "fp32", (1, 1, 32, 48, 64), 0.125, (16, 16), 0.0),
    "fp16_cross": ("bf16", "fp16", (2, 2, 19, 77, 128), 128 ** -0.5, (32, 32), 0.0),
    "fp16_one_query": ("bf16", "fp16", (1, 3, 1, 65, 64), 0.125, (16, 32), 0.0),
    "fp16_other_scale": ("bf16", "fp16", (1, 1, 17, 29, 64), 0.37, (16, 16), 0.0),
    "bf16_odd": ("bf16", "bf16", (2, 1, 45, 70, 128), 128 ** -0.5, (16, 32), 0.0),
    "fp8_fp16": ("fp8", "fp16", (2, 2, 41, 90, 64), 0.125, (16, 32), 0.0),
    "fp8_bf16_key_bias": ("fp8", "bf16", (1, 3, 33, 70, 128), 128 ** -0.5, (16, 32), 20.0),
    "fp8_long_keys": ("fp8", "fp16", (1, 1, 9, MEAN_ROWS + 188, 64), 0.125, (16, 64), 3.0),
    "int8_fp16": ("int8", "fp16", (2, 2, 41, 90, 64), 0.125, (16, 32), 0.0),
    "int8_bf16_key_bias": ("int8", "bf16", (1, 2, 20, 130, 128), 128 ** -0.5, (16, 32), 20.0),
}


def make_inputs(seed: int, dtype: str, shape: tuple, key_bias: float) -> dict[str, np.ndarray]:
    """Standard normal q, k, v (k plus a per-channel bias), as float32 values the dtype holds exactly."""
    batch, heads, seq_q, seq_k, head_dim = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, seq_q, head_dim))
    k = rng.standard_normal((batch, heads, seq_k, head_dim)) + key_bias * rng.standard_normal((1, 1, 1, head_dim))
    v = rng.standard_normal((batch, heads, seq_k, head_dim))
    return {name: t.astype(np.float32).astype(ROUND[dtype]).astype(np.float32) for name, t in zip("qkv", (q, k, v))}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """{case: (inputs, output)}: every case run once in a TRITON_INTERPRET=1 subprocess."""
    folder = tmp_path_factory.mktemp("interpreter")
    cases, arrays, inputs = [], {}, {}
    for seed, (name, (precision, dtype, shape, scale, (block_m, block_n), bias)) in enumerate(CASES.items()):
        inputs[name] = make_inputs(seed, dtype, shape, bias)
        arrays.update({f"{name}.{t}": a for t, a in inputs[name].items()})
        cases.append({"name": name, "precision": precision, "dtype": dtype, "scale": scale,
                      "tile": {"block_m": block_m, "block_n": block_n, "num_warps": 4, "num_stages": 2}})
    (folder / "cases.json").write_text(json.dumps(cases))
    np.savez(folder / "inputs.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "tests.plugins_trt.interpreter_worker", str(folder / "cases.json"),
                             str(folder / "inputs.npz"), str(folder / "outputs.npz")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = np.load(folder / "outputs.npz")
    return {name: (inputs[name], outputs[name]) for name in CASES}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[0] == "bf16"])
def test_unquantized_kernel_matches_reference(interpreted, name):
    precision, dtype, _, scale, _, _ = CASES[name]
    x, out = interpreted[name]
    err = rel_err(out, attention(x["q"], x["k"], x["v"], scale))
    assert err < EXACT_TOL[(precision, dtype)], err


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[0] != "bf16"])
def test_quantized_kernel_matches_reference_and_quantization_model(interpreted, name):
    precision, dtype, _, scale, (_, block_n), _ = CASES[name]
    x, out = interpreted[name]
    exact = rel_err(out, attention(x["q"], x["k"], x["v"], scale))
    assert exact < QUANT_TOL[precision], exact
    model = quantized_attention(x["q"], x["k"], x["v"], scale, precision, block_n=block_n, mean_rows=MEAN_ROWS)
    assert rel_err(out, model) < MODEL_TOL[dtype], rel_err(out, model)


def test_fp8_is_not_exact():
    """Guard for the tolerances above: the fp8 path really quantizes (it is not the bf16 path)."""
    x = make_inputs(0, "fp16", CASES["fp8_fp16"][2], 0.0)
    model = quantized_attention(x["q"], x["k"], x["v"], 0.125, "fp8", block_n=32, mean_rows=MEAN_ROWS)
    assert rel_err(model, attention(x["q"], x["k"], x["v"], 0.125)) > 1e-2


def test_run_attention_rejects_bad_inputs():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton", reason="Triton is not installed")
    from wanrt.plugins_trt.kernels import run_attention

    q = torch.zeros(1, 2, 8, 64)
    with pytest.raises(WanrtError, match="do not match"):
        run_attention(q, torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32), 0.1)
    with pytest.raises(WanrtError, match="differ in dtype"):
        run_attention(q, q.half(), q, 0.1)
    with pytest.raises(WanrtError, match="positive finite"):
        run_attention(q, q, q, -1.0)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(WanrtError, match="TRITON_INTERPRET=1"):
            run_attention(q, q, q, 0.1)
    with pytest.raises(WanrtError, match="head size"):
        run_attention(torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32), math.sqrt(1 / 32))
