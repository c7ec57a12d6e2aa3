"""TensorRT for building plans: importing it, the build GPU, and the places where 10.x and 11.x differ.

Supported: TensorRT 10.8 or newer and 11.x (tensorrt.md §1, "TRT 11 removals").  Every network is
strongly typed: precision comes from the graph (fp32, bf16, fp16 tensors, Q/DQ nodes), never from
builder flags (11.x has none; on 10.x, setting them on a strongly typed network is an error).  One
function per difference, each taking the TensorRT module `trt` and deciding from its version or
from what it has:

- `network_flags`: 10.x needs `1 << STRONGLY_TYPED` (weak typing is its default); in 11.x the flag
  is deprecated and ignored ("Strongly typed mode is always enabled"), so only the plugin flag is set;
- `serialize_to_file`: `build_serialized_network_to_stream` (10.15+) streams the plan into its
  file; older 10.x builds it in host memory (`build_serialized_network`) and writes it;
- `enable_activation_resize`: `PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10` (10.10+), so that the
  runtime's `update_device_memory_size_for_shapes` sizes activations for the shapes it runs;
- `engine_weights_bytes`: `get_engine_stat(TOTAL_WEIGHTS_SIZE)` where it exists, else unknown;
- `serialization_config`: a refitted engine is serialized with `INCLUDE_REFIT` (10.14+) so it stays
  refittable, and without its lean runtime when it was built without it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.plans import parse_version

BUILDER_MODULES = ("tensorrt", "tensorrt_bindings")  # the official package, then its bare bindings wheel
OLDEST = (10, 8)
INSTALL_HINT = 'pip install "wanrt[trt]"'


class TensorRTUnavailable(WanrtError):
    """TensorRT's builder or a GPU to build on is missing; the message names which and how to get it."""


def import_tensorrt(what: str = "--target trt") -> Any:
    """The full TensorRT module (with the builder), 10.8 or newer; TensorRTUnavailable naming what is missing."""
    errors = []
    for name in BUILDER_MODULES:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError) as e:
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if not hasattr(module, "Builder"):
            errors.append(f"{name} {getattr(module, '__version__', '?')} has no builder")
            continue
        version = parse_version(str(getattr(module, "__version__", "")))
        if version[:2] < OLDEST:
            raise TensorRTUnavailable(f"{what} needs TensorRT {OLDEST[0]}.{OLDEST[1]} or newer; {name} is "
                                      f"{module.__version__}: {INSTALL_HINT}")  # fmt: skip
        return module
    raise TensorRTUnavailable(f"{what} needs TensorRT's builder (the tensorrt package), which does not import here "
                              f"({'; '.join(errors)}): {INSTALL_HINT}")  # fmt: skip


def build_gpu(what: str = "--target trt", index: int = 0):
    """The GPU plans are built on (`runtime.cuda.DeviceInfo`); TensorRTUnavailable when there is none."""
    from wanrt.runtime import cuda

    try:
        return cuda.device_info(index)
    except WanrtError as e:
        raise TensorRTUnavailable(f"{what} needs an NVIDIA GPU to build TensorRT plans on: {e}") from None


def major_version(trt) -> int:
    return parse_version(str(trt.__version__))[0]


def network_flags(trt, plugin: bool = False, major: int | None = None) -> int:
    """`create_network` flags: strongly typed (explicit on 10.x), and AOT Python plugins first when our plugin is used."""
    major = major_version(trt) if major is None else major
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major < 11 else 0
    if plugin:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):
            raise TensorRTUnavailable(f"--attention plugin needs a TensorRT with ahead-of-time Python plugins; "
                                      f"{trt.__version__} has no PREFER_AOT_PYTHON_PLUGINS: {INSTALL_HINT}")  # fmt: skip
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    return flags


def enable_activation_resize(trt, config: "trt.IBuilderConfig") -> bool:
    """Let the runtime size activation memory for the shapes it runs (10.10+); whether it could."""
    feature = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if feature is None:
        return False
    config.set_preview_feature(trt.PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10, True)
    return True


def plan_writer(trt, file):
    """An `IStreamWriter` that writes every piece TensorRT hands it into the open `file`."""

    class Writer(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data) -> int:
            file.write(data)
            self.written += len(data)
            return len(data)

    return Writer()


def serialize_to_file(trt, builder: "trt.Builder", network: "trt.INetworkDefinition", config: "trt.IBuilderConfig",
                      path: Path) -> bool:  # fmt: skip
    """Build the plan into `path` (streamed where TensorRT can, 10.15+); False when the builder failed."""
    with open(path, "wb") as file:
        if hasattr(builder, "build_serialized_network_to_stream"):
            return bool(builder.build_serialized_network_to_stream(network, config, plan_writer(trt, file)))
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            return False
        file.write(memoryview(plan))
        return True


def engine_weights_bytes(trt, engine: "trt.ICudaEngine") -> int | None:
    """Device bytes of all the engine's weights (TOTAL_WEIGHTS_SIZE), where this TensorRT reports it."""
    if not hasattr(trt, "EngineStat"):
        return None
    return int(engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE))


def serialization_config(trt, engine: "trt.ICudaEngine", lean_runtime_excluded: bool) -> "trt.ISerializationConfig | None":
    """How to serialize a refitted engine so it stays refittable (10.14+); None: plain `serialize()`."""
    if not hasattr(trt, "SerializationFlag") or not hasattr(trt.SerializationFlag, "INCLUDE_REFIT"):
        return None
    config = engine.create_serialization_config()
    config.set_flag(trt.SerializationFlag.INCLUDE_REFIT)
    if lean_runtime_excluded:
        config.set_flag(trt.SerializationFlag.EXCLUDE_LEAN_RUNTIME)
    return config
