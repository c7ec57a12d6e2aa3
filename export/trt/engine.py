"""Build one plan: network from ONNX (strongly typed), config, build straight into the plan file, read what was built.

The steps of Polygraphy's `NetworkFromOnnxPath` -> `CreateConfig` -> `EngineFromNetwork` ->
`SaveEngine`, written against TensorRT's own API so that every name is checked against the real
bindings' surface (`tests/test_tensorrt_api_surface.py`), and so that a builder failure comes
back as one line with TensorRT's own error messages and the component's name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import atomic_output
from wanrt.engines.plans import ProfileShapes
from wanrt.runtime.backends.tensorrt import LogBook, make_logger, plan_reader
from wanrt.runtime.backends.tensorrt_refit import parser_error_line

from .api import engine_weights_bytes, network_flags, serialize_to_file
from .config import TrtOptions, make_config, serialized_timing_cache


class PlanBuildError(WanrtError):
    """TensorRT could not parse or build a component; the message has TensorRT's own error lines."""


@dataclass
class BuildSession:
    """One TensorRT builder, its logger, and the build machine (TensorRT version, GPU)."""

    trt: Any  # the full tensorrt module
    builder: "trt.Builder"
    logger: "trt.ILogger"
    book: LogBook
    tensorrt_version: str
    compute_capability: str
    gpu_name: str = ""
    timing_cache: bytes = b""  # carried from one component's build to the next, saved at the end
    seconds: dict[str, float] = field(default_factory=dict)  # build time per component


def open_session(trt, compute_capability: str, gpu_name: str = "", timing_cache: bytes = b"") -> BuildSession:
    """A builder with a logger collecting TensorRT's messages."""
    book = LogBook()
    logger = make_logger(trt, book)
    builder = trt.Builder(logger)
    return BuildSession(trt, builder, logger, book, str(trt.__version__), compute_capability, gpu_name, timing_cache)


def _errors(book: LogBook, mark: int, fallback: str) -> str:
    errors = book.errors_since(mark)
    return "; ".join(errors[-3:]) if errors else fallback


def network_from_onnx(session: BuildSession, onnx_path: Path, name: str, plugin: bool = False
                      ) -> tuple["trt.INetworkDefinition", "trt.OnnxParser"]:  # fmt: skip
    """The strongly typed network of `onnx_path` (external data resolved beside it); PlanBuildError with the parser's errors."""
    trt = session.trt
    builder: "trt.Builder" = session.builder
    network = builder.create_network(network_flags(trt, plugin))
    parser = trt.OnnxParser(network, session.logger)
    mark = session.book.mark()
    if not parser.parse_from_file(str(onnx_path)):
        lines = [parser_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PlanBuildError(f"{name}: TensorRT's ONNX parser rejected {onnx_path}: "
                             f"{'; '.join(lines[:3]) or _errors(session.book, mark, 'no error reported')}")  # fmt: skip
    return network, parser


def build_plan(session: BuildSession, name: str, onnx_path: Path, plan_path: Path, flags: list[str], options: TrtOptions,
               profiles: list[ProfileShapes], plugin: bool = False) -> None:  # fmt: skip
    """Build `onnx_path` into `plan_path` (written atomically); the session's timing cache is updated."""
    start = time.monotonic()
    network, parser = network_from_onnx(session, onnx_path, name, plugin)
    config = make_config(session.trt, session.builder, flags, options, profiles, session.timing_cache)
    mark = session.book.mark()
    with atomic_output(plan_path) as tmp:
        if not serialize_to_file(session.trt, session.builder, network, config, tmp):
            raise PlanBuildError(f"{name}: TensorRT's builder failed: {_errors(session.book, mark, 'no error reported')}")
    session.timing_cache = serialized_timing_cache(config)
    session.seconds[name] = time.monotonic() - start
    del parser, network


@dataclass(frozen=True)
class PlanFacts:
    """What the built engine reports: weight bytes (all, streamable) and activation memory per profile."""

    streamable_weights_bytes: int
    weights_bytes: int | None
    device_memory_bytes: list[int]  # get_device_memory_size_for_profile_v2 per profile
    hardware_compatibility: str


def read_plan_facts(session: BuildSession, plan_path: Path, name: str) -> PlanFacts:
    """Deserialize the built plan (streamed from its file) and read its numbers; PlanBuildError when it does not load."""
    trt = session.trt
    runtime = trt.Runtime(session.logger)
    runtime.engine_host_code_allowed = True  # a version-compatible plan embeds its lean runtime; we just built it
    mark = session.book.mark()
    with open(plan_path, "rb") as file:
        engine: "trt.ICudaEngine" = runtime.deserialize_cuda_engine(plan_reader(trt, file))
    if engine is None:
        raise PlanBuildError(f"{name}: the plan just built does not deserialize: {_errors(session.book, mark, 'no error reported')}")
    return PlanFacts(
        streamable_weights_bytes=int(engine.streamable_weights_size),
        weights_bytes=engine_weights_bytes(trt, engine),
        device_memory_bytes=[int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(engine.num_optimization_profiles)],
        hardware_compatibility=hardware_level_name(engine.hardware_compatibility_level),
    )


def hardware_level_name(level: Any) -> str:
    """`trt.HardwareCompatibilityLevel.AMPERE_PLUS` -> "AMPERE_PLUS" (pybind11 enums print as `Class.MEMBER`)."""
    return str(getattr(level, "name", level)).rpartition(".")[2]

