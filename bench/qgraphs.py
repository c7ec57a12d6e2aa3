"""Quantized DiT graphs for the benchmarks: export, calibrate on given inputs, read block outputs.

The bench scripts (`bench/step.py`, `bench/quant_quality.py`) have no text encoder at real width,
so they cannot run `build-engine`'s trajectory calibration (`calibration.calibrate`).  They use the
same pieces on inputs they make themselves:

- `export_graph`: `export.onnx.dit.export_dit_onnx` (fp32), with the build's weight Q/DQ pass
  (`calibration.qdq.weight_qdq_pass`) for int8 / fp8: the W8A16 graph `model.onnx`;
- `calibrate_w8a8`: the build's range collection (`calibration.qdq.with_amax_outputs` +
  `calibration.calibrate.RangeObserver`) over the given feeds, then `insert_activation_qdq`; the
  W8A8 graph is written beside the W8A16 one (`w8a8.onnx`, same external data file);
- `block_outputs` / `with_outputs`: the residual stream after each DiT block, found by the
  exporter's name scopes (`blocks.N`), added as extra graph outputs.
"""

from __future__ import annotations

import ast
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

W8A8_GRAPH = "w8a8.onnx"  # beside the W8A16 `model.onnx` of a quantized export (shares its data file)
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def export_graph(view: Mapping, cfg, out_dir: Path, scheme: str | None, fresh: bool = False) -> tuple[Path, float | None]:
    """`out_dir/model.onnx` of `view`: fp32 (`scheme` None) or W8A16 `scheme` codes; (graph, export seconds or None if reused)."""
    from wanrt.calibration.qdq import weight_qdq_pass
    from wanrt.export.onnx.dit import export_dit_onnx

    graph = out_dir / "model.onnx"
    if graph.is_file() and not fresh:
        return graph, None
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    passes = [weight_qdq_pass(view, scheme)] if scheme else []
    export_dit_onnx(view, tmp, "fp32", cfg=cfg, progress=False, passes=passes)
    os.replace(tmp, out_dir)
    return graph, time.perf_counter() - start


def session(graph: Path | str, threads: int = 0, model: onnx.ModelProto | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU session with the runtime's own session options (`model`: run this proto, weights beside `graph`).

    `optimization="disable"`: no graph fusion, so Q/DQ run as written (the exact quantization math in
    float32) instead of ONNX Runtime's fused int8 kernels."""
    import onnxruntime as ort

    from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions

    ort_options = OrtOptions(device="cpu", intra_op_threads=threads, optimization=optimization)
    options = OnnxRuntimeBackend(ort_options).session_options()
    if model is None:
        return ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    tmp = Path(graph).with_name(Path(graph).stem + ".extra.onnx")  # beside the graph: external data resolves there
    onnx.save(model, str(tmp))
    try:
        return ort.InferenceSession(str(tmp), sess_options=options, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)


def calibrate_w8a8(w8a16: Path, scheme: str, feeds: Iterable[Mapping[str, np.ndarray]], threads: int = 0,
                   fresh: bool = False) -> tuple[Path, dict[str, float] | None, float | None]:  # fmt: skip
    """The W8A8 graph of the W8A16 graph `w8a16`, ranges (`max`) over `feeds`; (graph, scales, seconds), None, None if reused."""
    from wanrt.calibration.calibrate import RangeObserver
    from wanrt.calibration.qdq import insert_activation_qdq, with_amax_outputs

    out = w8a16.with_name(W8A8_GRAPH)
    if out.is_file() and not fresh:
        return out, None, None
    model = onnx.load(str(w8a16), load_external_data=False)
    calib, outputs = with_amax_outputs(model)
    start = time.perf_counter()
    sess = session(w8a16, threads, calib)
    names = [o.name for o in sess.get_outputs()]
    observer = RangeObserver(outputs)
    for f in feeds:
        observer.update(dict(zip(names, sess.run(names, dict(f)))))
    del sess
    scales = insert_activation_qdq(model, scheme, observer.amax)
    tmp = out.with_name(out.name + ".partial")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out, scales, time.perf_counter() - start


def _block_of(node: onnx.NodeProto) -> int | None:
    """N when the exporter put `node` inside the module `blocks.N` (its name scopes metadata)."""
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            scopes = ast.literal_eval(p.value)
            if len(scopes) > 1 and scopes[1].startswith("blocks."):
                index = scopes[1].removeprefix("blocks.")
                return int(index) if index.isdigit() else None
    return None


def block_outputs(model: onnx.ModelProto) -> list[str]:
    """The residual stream after each DiT block: the output of the last node (graph order) of each `blocks.N` scope."""
    last: dict[int, str] = {}
    for node in model.graph.node:
        block = _block_of(node)
        if block is not None:
            last[block] = node.output[0]
    if sorted(last) != list(range(len(last))):
        raise ValueError(f"the graph's blocks are not numbered 0..N-1: {sorted(last)}")
    return [last[i] for i in range(len(last))]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (float32, shapes left to the runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in have)
    return out


def compare(x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Cosine similarity and relative L2 error of `x` against `ref` (flattened, float64)."""
    a, b = x.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b))}  # fmt: skip
