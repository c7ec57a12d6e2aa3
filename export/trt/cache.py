"""When a plan can be reused: its build key (options + TensorRT + GPU + plugin + profiles) and cache key (+ the graph).

A plan is rebuilt when TensorRT's version, the GPU, the graph, the flags, the profiles, the
optimization level or the plugin change, and reused otherwise (`plan_keys`).  The timing cache
(TensorRT's measured tactic timings) is one file per TensorRT version and GPU, beside the
digest cache (`engines.digests.cache_file`) unless `--timing-cache` names another; it is loaded
before and saved after every build, so a rebuild after a LoRA change skips the timing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from wanrt.engines.digests import cache_file
from wanrt.engines.files import atomic_write_bytes
from wanrt.engines.plans import PluginRecord, ProfileShapes, parse_compute_capability

BUILD_KEY_FORMAT = 1  # bump when the build steps change what the same inputs produce


def _sha256_json(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_key(tensorrt_version: str, compute_capability: str, flags: list[str], options: dict, profiles: list[ProfileShapes],
              plugin: PluginRecord | None) -> str:  # fmt: skip
    """Everything but the graph that decides a plan's bytes."""
    return _sha256_json({
        "format": BUILD_KEY_FORMAT, "tensorrt": tensorrt_version, "gpu": list(parse_compute_capability(compute_capability)),
        "flags": sorted(flags), "options": options, "profiles": [{k: list(v) for k, v in p.shapes.items()} for p in profiles],
        "plugin": asdict(plugin) if plugin is not None else None,
    })  # fmt: skip


def plan_cache_key(graph_sha256: str, key: str) -> str:
    """The plan's cache key: its graph's digest (`engines.plans.graph_digest`) and its build key."""
    return hashlib.sha256(f"{graph_sha256}\0{key}".encode()).hexdigest()


def default_timing_cache(tensorrt_version: str, compute_capability: str) -> Path:
    """`<wanrt cache>/timing/trt<version>.sm<NN>.cache`: a timing cache holds one TensorRT version's timings on one GPU."""
    major, minor = parse_compute_capability(compute_capability)
    return cache_file().parent / "timing" / f"trt{tensorrt_version}.sm{major}{minor}.cache"


def read_timing_cache(path: Path) -> bytes:
    """The saved timing cache, or b"" (an empty one) when there is none yet."""
    return path.read_bytes() if path.is_file() else b""


def save_timing_cache(path: Path, data: bytes) -> None:
    """Save the timing cache atomically (a concurrent build reads either the old or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
