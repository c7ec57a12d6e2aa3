"""Refit a TensorRT engine from an ONNX file: needs the full `tensorrt` (its ONNX parser refitter; `tensorrt_lean` has none).

Two users: the TensorRT backend, for a stripped plan (STRIP_PLAN: the plan holds no weights, they come from the
component's ONNX at every load; `runtime_for_plan` sends such plans to the full runtime only), and
`cli.py refit`, which swaps LoRA-merged weights into a refittable plan and serializes it again.
"""

from __future__ import annotations

from pathlib import Path

from .base import EngineRunError
from .tensorrt import LogBook


def refit_from_onnx(trt, engine: "trt.ICudaEngine", logger: "trt.ILogger", log: LogBook, onnx_path: Path, name: str) -> None:
    """Put the weights of the ONNX file `onnx_path` into the refittable `engine` (full tensorrt: its ONNX refitter).

    A stripped plan gets every weight this way at load; `refit` swaps LoRA-merged weights into a refittable plan."""
    mark = log.mark()
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = [parser_error_line(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise EngineRunError(f"{name}: refitting from {onnx_path} failed: {'; '.join(errors or log.errors_since(mark)) or 'no error reported'}")
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        detail = f"weights missing from {onnx_path.name}: {', '.join(missing[:5])}" if missing else "; ".join(log.errors_since(mark))
        raise EngineRunError(f"{name}: refitting the plan failed: {detail or 'no error reported'}")


def parser_error_line(error: "trt.ParserError") -> str:
    """One ONNX parser (or parser refitter) error as a line: its description and the node it names."""
    node = error.node_name() or (str(error.node()) if error.node() >= 0 else "")
    where = f" (node {node}, {error.node_operator()})" if node else ""
    return f"{error.desc()}{where}"
