"""What exported graphs depend on beyond their inputs: wanrt's own code and the export-path libraries.

Both the build's component cache keys (`export.build.cache_key`) and the traced-graph cache
(`export.onnx.graph_cache`) include `export_versions()`, so a change of either invalidates them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from wanrt import __version__

BUILD_FORMAT = 1  # bump when the exported graphs change for the same inputs
EXPORT_PACKAGES = ("torch", "onnx", "onnxscript", "onnx_ir", "numpy")  # their versions can change the graphs


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the exporter's own code and data (engines/, export/, calibration/, plugins_trt/)."""
    repo = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("engines", "export", "calibration", "plugins_trt"):
        for path in sorted((repo / folder).rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The installed versions of `packages` (those not installed are left out)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def export_versions() -> dict[str, str]:
    """wanrt's version and code digest, the build format, and the export-path libraries' versions."""
    return {"wanrt": __version__, "wanrt_source": source_digest(), "build_format": str(BUILD_FORMAT),
            **package_versions(EXPORT_PACKAGES)}  # fmt: skip
