"""Run attention cases through `plugins_trt.kernels.run_attention` in Triton's CPU interpreter.

Triton decides at import whether `@triton.jit` means GPU code or interpreted Python, so the
interpreter needs its own process: `python -m tests.plugins_trt.interpreter_worker CASES.json
INPUTS.npz OUTPUTS.npz` with TRITON_INTERPRET=1 and the repository root as the working folder.
Inputs hold float32 values already representable in each case's dtype; outputs are float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import cli  # noqa: F401  (binds `wanrt` to this checkout)

import torch  # noqa: E402

from wanrt.plugins_trt.kernels import TileConfig, run_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(cases_path: str, inputs_path: str, outputs_path: str) -> None:
    cases = json.loads(Path(cases_path).read_text())
    inputs = np.load(inputs_path)
    outputs = {}
    for case in cases:
        q, k, v = (torch.from_numpy(inputs[f"{case['name']}.{t}"]).to(DTYPES[case["dtype"]]) for t in "qkv")
        out = run_attention(q, k, v, case["scale"], precision=case["precision"], tile=TileConfig(**case["tile"]))
        assert out.dtype == q.dtype and out.shape == q.shape
        outputs[case["name"]] = out.float().numpy()
    np.savez(outputs_path, **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:4])
