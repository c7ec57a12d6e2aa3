"""Import the real TensorRT Python bindings without TensorRT's libraries, to exercise their pure-Python parts.

`tensorrt-cu12-bindings` (the real wheel: package `tensorrt_bindings`, with the pure-Python
`tensorrt_bindings.plugin`, QDP) links against libnvinfer / libnvonnxparser / libnvinfer_plugin,
which cannot be installed here.  Its extension module needs only 9 C entry points from them
(`compiled-path-facts.md`); `build_stub_libraries` compiles a C file exporting those 9, each
returning NULL (or 0), under the three sonames.  With that folder on LD_LIBRARY_PATH the real
module imports, so the plugin decorators' own validation runs; nothing can be built or run
through it (the registry is NULL: eager plugin registration fails), and nothing must try
(`tensorrt_lean.Runtime(...).deserialize_cuda_engine` without a GPU segfaults).

The `tensorrt` meta package is `from tensorrt_bindings import *` plus `tensorrt.plugin` =
`tensorrt_bindings.plugin`; `ALIAS_TENSORRT` does the same in a subprocess (the plugin module itself
does `import tensorrt`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

ENTRY_POINTS = (
    "createInferBuilder_INTERNAL", "createInferRuntime_INTERNAL", "createInferRefitter_INTERNAL",
    "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getPluginRegistry",
    "getBuilderPluginRegistry", "initLibNvInferPlugins",
)  # fmt: skip
SONAMES = ("libnvinfer.so.11", "libnvonnxparser.so.11", "libnvinfer_plugin.so.11")

# Run first in a subprocess with the stub folder on LD_LIBRARY_PATH: `tensorrt` is the bindings.
ALIAS_TENSORRT = (
    "import sys, tensorrt_bindings; sys.modules['tensorrt'] = tensorrt_bindings; "
    "import tensorrt_bindings.plugin; sys.modules['tensorrt.plugin'] = tensorrt_bindings.plugin\n"
)


def missing_prerequisite() -> str | None:
    """Why the stand-in cannot be used here (None: it can)."""
    if importlib.util.find_spec("tensorrt_bindings") is None:
        return "the TensorRT Python bindings are not installed (pip install tensorrt-cu12-bindings==11.4.0.106)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the stand-in TensorRT libraries"
    return None


def build_stub_libraries(folder: Path) -> Path:
    """Compile the stand-in libraries into `folder` (one object, three sonames) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "nvinfer_stub.c"
    lines = [f"void *{name}(void) {{ return 0; }}" for name in ENTRY_POINTS]
    lines.append("int getNvOnnxParserVersion(void) { return 0; }")
    source.write_text("\n".join(lines) + "\n")
    library = folder / SONAMES[0]
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    for soname in SONAMES[1:]:
        (folder / soname).unlink(missing_ok=True)
        (folder / soname).symlink_to(library.name)
    return folder


def stub_env(folder: Path) -> dict[str, str]:
    """The environment for a subprocess that imports the bindings through the stand-in."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(folder), env.get("LD_LIBRARY_PATH", "")) if p)
    return env
