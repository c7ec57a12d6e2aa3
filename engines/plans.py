"""TensorRT plans in a bundle: what the manifest records about each plan, and whether one runs here.

The exporter (`build-engine --target trt`) writes one `PlanInfo` per plan into its component's
`plans` list; the runtime picks the plan that runs on this GPU and TensorRT (`plan_runs_here`)
before deserializing anything. A component may hold plans for several GPUs.

Compatibility (TensorRT developer guide, "Version Compatibility" and "Hardware Compatibility"):
- a plan runs on the TensorRT version that built it; a `VERSION_COMPATIBLE` plan also runs on
  later TensorRT versions of the same major version;
- `hardware_compatibility` NONE: only GPUs of the compute capability it was built on;
  SAME_COMPUTE_CAPABILITY: the same; AMPERE_PLUS: any GPU of compute capability 8.0 or newer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

HARDWARE_LEVELS = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")  # trt.HardwareCompatibilityLevel members


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile: (min, opt, max) shape of every dynamic input, and its activation memory."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    device_memory_bytes: int | None = None  # device_memory_size_v2 at this profile's max, where measured


@dataclass(frozen=True)
class PluginRecord:
    """A plugin whose kernels the plan embeds (ahead-of-time Python plugin)."""

    name: str  # "WanAttention"
    namespace: str  # "wanrt"
    version: str  # "1"
    precision: str  # "bf16" / "fp8"
    kernel_archs: list[str] = field(default_factory=list)  # ["sm_80", "sm_90", ...]


@dataclass(frozen=True)
class PlanInfo:
    """One serialized TensorRT engine of a component (its file is listed, with its sha256, in `files`)."""

    path: str  # relative to the bundle
    tensorrt_version: str  # "11.4.0.106"
    compute_capability: str  # of the build GPU, "9.0"
    hardware_compatibility: str = "NONE"  # one of HARDWARE_LEVELS
    version_compatible: bool = False  # VERSION_COMPATIBLE (+ EXCLUDE_LEAN_RUNTIME: the box needs tensorrt-lean)
    lean_runtime_excluded: bool = False
    refittable: bool = False  # REFIT
    stripped: bool = False  # STRIP_PLAN: weights come from the component's ONNX at load (refit)
    weight_streaming: bool = False  # WEIGHT_STREAMING
    streamable_weights_bytes: int | None = None  # ICudaEngine.streamable_weights_size
    weights_bytes: int | None = None  # ICudaEngine.get_engine_stat(TOTAL_WEIGHTS_SIZE): device bytes of all weights
    opt_level: int = 3  # builder_optimization_level
    profiles: list[ProfileShapes] = field(default_factory=list)
    attention: str = "native"  # "native" or "plugin"
    plugin: PluginRecord | None = None
    onnx_sha256: str = ""  # the graph the plan was built from: `graph_digest` of its ONNX file(s)
    cache_key: str = ""  # graph + options + TensorRT version + GPU: a plan is rebuilt when it changes
    build_key: str = ""  # options + TensorRT version + GPU + plugin, without the graph (cache_key = graph + this)
    graph: str = ""  # the ONNX file it was built from, relative to the bundle ("" when the bundle keeps no ONNX);
    #                  a stripped plan gets its weights from this graph at load, and `refit` refits from it
    builder_flags: list[str] = field(default_factory=list)  # trt.BuilderFlag member names set for the build


def plan_file_name(tensorrt_version: str, compute_capability: str) -> str:
    """The plan file of one TensorRT version and GPU in its component's folder: `model.trt11.4.0.106.sm90.plan`."""
    major, minor = parse_compute_capability(compute_capability)
    return f"model.trt{tensorrt_version}.sm{major}{minor}.plan"


def graph_digest(file_digests: Mapping[str, str]) -> str:
    """One sha256 for an ONNX graph and its external data: over the files' names (in the folder) and sha256s."""
    text = "".join(f"{name}\0{digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def shapes_fit(profile: ProfileShapes, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every shape the profile lists for an input in `shapes` lies within its min..max."""
    for name, (lo, _, hi) in profile.shapes.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def profile_for_shapes(plan: PlanInfo, shapes: Mapping[str, tuple[int, ...]]) -> ProfileShapes | None:
    """The first profile of `plan` holding `shapes` (inputs a profile does not list are not checked), or None."""
    return next((p for p in plan.profiles if shapes_fit(p, shapes)), None)


def parse_version(text: str) -> tuple[int, ...]:
    """"11.4.0.106" -> (11, 4, 0, 106); non-numeric parts end the tuple."""
    out = []
    for part in text.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def parse_compute_capability(text: str) -> tuple[int, int]:
    """"9.0" or "sm_90" -> (9, 0)."""
    if text.startswith("sm_"):
        digits = text[3:].rstrip("a")
        return int(digits[:-1]), int(digits[-1])
    major, minor = text.split(".")
    return int(major), int(minor)


def plan_runs_here(plan: PlanInfo, tensorrt_version: str, compute_capability: str) -> tuple[bool, str]:
    """(True, "") if `plan` runs with this TensorRT on a GPU of this compute capability, else (False, why)."""
    built, here = parse_version(plan.tensorrt_version), parse_version(tensorrt_version)
    if plan.version_compatible:
        if not built or not here or built[0] != here[0] or here < built:
            return False, (
                f"plan {plan.path} is version-compatible from TensorRT {plan.tensorrt_version} within major version"
                f" {built[:1][0] if built else '?'}; this box has TensorRT {tensorrt_version}"
            )
    elif built != here:
        return False, f"plan {plan.path} was built with TensorRT {plan.tensorrt_version}; this box has TensorRT {tensorrt_version}"
    cc_built, cc_here = parse_compute_capability(plan.compute_capability), parse_compute_capability(compute_capability)
    if plan.hardware_compatibility == "AMPERE_PLUS":
        if cc_here < (8, 0):
            return False, f"plan {plan.path} runs on compute capability 8.0 or newer (AMPERE_PLUS); this GPU is {compute_capability}"
    elif cc_here != cc_built:
        return False, f"plan {plan.path} was built for compute capability {plan.compute_capability}; this GPU is {compute_capability}"
    if plan.plugin is not None:
        arch = f"sm_{cc_here[0]}{cc_here[1]}"
        if plan.plugin.kernel_archs and arch not in plan.plugin.kernel_archs:
            return False, f"plan {plan.path} embeds {plan.plugin.name} kernels for {', '.join(plan.plugin.kernel_archs)}, not {arch}"
    return True, ""


def pick_plan(plans: list[PlanInfo], tensorrt_version: str, compute_capability: str) -> tuple[PlanInfo | None, list[str]]:
    """The first plan that runs here (plans built for exactly this GPU and TensorRT first), and why each other one does not."""
    exact = sorted(
        plans,
        key=lambda p: (p.tensorrt_version != tensorrt_version, p.compute_capability != compute_capability),
    )
    reasons = []
    for plan in exact:
        ok, why = plan_runs_here(plan, tensorrt_version, compute_capability)
        if ok:
            return plan, reasons
        reasons.append(why)
    return None, reasons
