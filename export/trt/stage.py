"""The TensorRT step of a bundle build: per component, which existing plans to keep and which plan to build.

`build_bundle` calls `open_build` before it writes anything (TensorRT or the GPU missing, or bad
options: one line, exit 2, nothing written), then `stage_plans` once every component's ONNX is in
the staged bundle.  For each component:

- the existing bundle's plans built from the same graph (`PlanInfo.onnx_sha256`) with intact files
  are kept, plans for other GPUs and TensorRT versions included;
- with `--target trt|all`, the plan for this GPU and TensorRT is reused when its cache key (graph +
  build key) matches, else built from the staged ONNX;
- with `--target trt`, the ONNX files then leave the bundle (the manifest's `onnx` is null).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from wanrt.engines.digests import cached_sha256
from wanrt.engines.errors import WanrtError
from wanrt.engines.files import remove_path
from wanrt.engines.manifest import Component, Manifest
from wanrt.engines.plans import PlanInfo, PluginRecord, ProfileShapes, graph_digest, plan_file_name

from .cache import build_key, default_timing_cache, plan_cache_key, read_timing_cache, save_timing_cache
from .config import TrtOptions, builder_flags
from .profiles import ShapeRequest, named_dims, profile_shapes

TARGETS = ("onnx", "trt", "all")


@dataclass(frozen=True)
class ModelShape:
    """What the profile rules need to know about the model: VAE stride, CFG, task."""

    stride: tuple[int, int, int]
    cfg: bool
    task: str


@dataclass
class TrtBuild:
    """A `--target trt|all` build: the options, the shapes, this machine's TensorRT and GPU, and the open builder."""

    target: str
    options: TrtOptions
    request: ShapeRequest
    tensorrt_version: str
    compute_capability: str
    timing_cache_path: Path
    session: Any = None  # engine.BuildSession (None in tests of the pure steps)
    plugin: PluginRecord | None = None

    @property
    def keeps_onnx(self) -> bool:
        return self.target == "all"


def open_build(target: str, options: TrtOptions, request: ShapeRequest, io_dtype: str = "bf16", head_dim: int = 128,
               log: Callable[[str], None] = lambda msg: None) -> TrtBuild:  # fmt: skip
    """Check the options, import TensorRT, find the GPU, open a builder; TensorRTUnavailable/WanrtError before anything is written."""
    if target not in TARGETS or target == "onnx":
        raise WanrtError(f"--target {target!r}: expected trt or all for a TensorRT build")
    options.check()
    if options.strip_plan and target == "trt":
        raise WanrtError("--strip-plan: a stripped plan takes its weights from the bundle's ONNX at load: use --target all")
    from .api import build_gpu, import_tensorrt
    from .engine import open_session

    trt = import_tensorrt(f"--target {target}")
    gpu = build_gpu(f"--target {target}")
    version = str(trt.__version__)
    cache_path = options.timing_cache or default_timing_cache(version, gpu.compute_capability)
    plugin = None
    if options.attention == "plugin":
        plugin = register_attention_plugin(options, gpu.compute_capability, io_dtype, head_dim, log)
    session = open_session(trt, gpu.compute_capability, gpu.name, read_timing_cache(cache_path))
    return TrtBuild(target, options, request, version, gpu.compute_capability, cache_path, session, plugin)


def register_attention_plugin(options: TrtOptions, compute_capability: str, io_dtype: str, head_dim: int,
                              log: Callable[[str], None] = lambda msg: None) -> PluginRecord:  # fmt: skip
    """Define our attention plugin for this GPU before any DiT is parsed: the kernels of `--plugin DIR`, or
    (without it) kernels `plugin-build` compiles for this GPU, precision, I/O dtype and head size into the cache."""
    from wanrt.engines.plans import parse_compute_capability
    from wanrt.plugins_trt.aot import plugin_record, read_plugin
    from wanrt.plugins_trt.tensorrt_plugin import register_plugin

    major, minor = parse_compute_capability(compute_capability)
    arch = major * 10 + minor
    plugin_dir = options.plugin_dir or cached_plugin(arch, options.attention_precision, io_dtype, head_dim, log)
    registration = register_plugin(plugin_dir, options.attention_precision, arch)
    return plugin_record(read_plugin(plugin_dir), registration.precision, [arch])


def cached_plugin(arch: int, precision: str, io_dtype: str, head_dim: int, log: Callable[[str], None] = lambda msg: None,
                  root: Path | None = None) -> Path:  # fmt: skip
    """The plugin folder for one kernel variant under `<wanrt cache>/plugins/`, compiled (`plugins_trt.aot.build_plugin`)
    unless a complete one compiled from the same kernel source by the same Triton is there."""
    from wanrt.engines.digests import cache_file
    from wanrt.plugins_trt.aot import PluginBuildError, arch_name, build_plugin, kernel_source_digest, read_plugin

    folder = (root or cache_file().parent / "plugins") / (
        f"{arch_name(arch)}-{precision}-{io_dtype}-d{head_dim}-{kernel_source_digest()[:16]}")
    try:
        read_plugin(folder)
        return folder
    except PluginBuildError:
        pass  # absent or incomplete: compile it
    log(f"compiling the attention plugin's {precision} kernels for {arch_name(arch)} ({io_dtype}, head size {head_dim}) into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_plugin(folder, (arch,), (precision,), (io_dtype,), (head_dim,), log)
    return folder


def component_profiles(comp: Component, request: ShapeRequest, shape: ModelShape) -> list[ProfileShapes]:
    """The one optimization profile of `comp` for the request (`profiles` module)."""
    dims = named_dims(comp.kind, request, shape.stride, comp.signature, cfg=shape.cfg, task=shape.task)
    return [profile_shapes(comp.name, comp.signature, dims, shape.stride)]


def expected_plan(comp: Component, build: TrtBuild, graph_sha256: str, shape: ModelShape) -> PlanInfo:
    """The record of the plan this build makes for `comp` (before the engine's own numbers are known)."""
    flags = builder_flags(comp.kind, build.options)
    profiles = component_profiles(comp, build.request, shape)
    plugin = build.plugin if comp.kind == "dit" else None
    key = build_key(build.tensorrt_version, build.compute_capability, flags, build.options.key_fields(), profiles, plugin)
    return PlanInfo(
        path=f"{comp.name}/{plan_file_name(build.tensorrt_version, build.compute_capability)}",
        tensorrt_version=build.tensorrt_version,
        compute_capability=build.compute_capability,
        version_compatible="VERSION_COMPATIBLE" in flags,
        lean_runtime_excluded="EXCLUDE_LEAN_RUNTIME" in flags,
        refittable="REFIT" in flags,
        stripped="STRIP_PLAN" in flags,
        weight_streaming="WEIGHT_STREAMING" in flags,
        opt_level=build.options.opt_level,
        profiles=profiles,
        attention=build.options.attention if comp.kind == "dit" else "native",
        plugin=plugin,
        onnx_sha256=graph_sha256,
        cache_key=plan_cache_key(graph_sha256, key),
        build_key=key,
        graph=comp.onnx if build.keeps_onnx and comp.onnx else "",
        builder_flags=flags,
    )


def staged_graph_digest(comp: Component, root: Path) -> str:
    """`graph_digest` of the component's ONNX files under `root` ("" when it has none)."""
    if not comp.files:
        return ""
    digests = cached_sha256([root / rel for rel in comp.files])
    return graph_digest({Path(rel).name: digests[str(root / rel)] for rel in comp.files})


def intact(manifest: Manifest, root: Path, rels: list[str]) -> bool:
    """Whether every file `rels` is listed in `manifest` and on disk under `root` with its recorded size and sha256."""
    metas = [(root / rel, manifest.files.get(rel)) for rel in rels]
    if any(meta is None or not path.is_file() or path.stat().st_size != meta["size"] for path, meta in metas):
        return False
    digests = cached_sha256([path for path, _ in metas])
    return all(digests[str(path)] == meta["sha256"] for path, meta in metas)


def kept_plans(old: Manifest | None, old_root: Path, name: str, graph_sha256: str) -> list[PlanInfo]:
    """The existing bundle's plans of component `name` built from this graph, with intact files."""
    if old is None or name not in old.components or not graph_sha256:
        return []
    return [p for p in old.components[name].plans if p.onnx_sha256 == graph_sha256 and intact(old, old_root, [p.path])]


def has_current_plan(comp: Component, build: TrtBuild, shape: ModelShape) -> bool:
    """Whether a plan-only component (no ONNX to build from) already has this build's plan."""
    graphs = {p.onnx_sha256 for p in comp.plans}
    return any(expected_plan(comp, build, g, shape).cache_key in {p.cache_key for p in comp.plans} for g in graphs)


def with_facts(plan: PlanInfo, facts) -> PlanInfo:
    """The plan record completed with what the built engine reports (`engine.PlanFacts`)."""
    profiles = [replace(p, device_memory_bytes=m) for p, m in zip(plan.profiles, facts.device_memory_bytes)]
    return replace(plan, streamable_weights_bytes=facts.streamable_weights_bytes if plan.weight_streaming else None,
                   weights_bytes=facts.weights_bytes, profiles=profiles or plan.profiles,
                   hardware_compatibility=facts.hardware_compatibility)  # fmt: skip


def stage_plans(build: TrtBuild | None, components: dict[str, Component], old: Manifest | None, old_root: Path, tmp: Path,
                shape: ModelShape, log: Callable[[str], None], link: Callable[[Path, Path], None],
                requested: set[str], refit=None) -> dict[str, Component]:  # fmt: skip
    """Every component with its plans decided (kept; for the `requested` ones also reused or built) and, for
    `--target trt`, without its ONNX.  `refit` (`refit.RefitSession`): a requested component's refittable plan for
    this GPU and TensorRT built from another graph is refitted from the new one instead of dropped (`cli.py refit`)."""
    out: dict[str, Component] = {}
    todo = [name for name in components if name in requested] if build is not None else []
    for comp in components.values():
        graph = staged_graph_digest(comp, tmp) if comp.onnx is not None else next((p.onnx_sha256 for p in comp.plans), "")
        plans = kept_plans(old, old_root, comp.name, graph)
        if comp.name in todo:
            want = expected_plan(comp, build, graph, shape)
            same_machine = [p for p in plans if p.path == want.path]
            plans = [p for p in plans if p.path != want.path]
            position = f"[trt {todo.index(comp.name) + 1}/{len(todo)}] {comp.name}"
            if same_machine and same_machine[0].cache_key == want.cache_key:
                plans.append(same_machine[0])
                log(f"{position}: plan unchanged, reused ({want.path})")
            else:
                plans.append(build_component_plan(build, comp, want, tmp, log, position))
        elif refit is not None and comp.name in requested and comp.onnx is not None:
            plans += refitted_plans(refit, old, old_root, comp, tmp, graph, log)
        for plan in plans:
            if not (tmp / plan.path).exists():
                link(old_root / plan.path, tmp / plan.path)
        comp = replace(comp, plans=plans)
        if comp.name in todo and not build.keeps_onnx and comp.onnx is not None:
            for rel in comp.files:
                remove_path(tmp / rel)
            comp = replace(comp, onnx=None, files=[])
        out[comp.name] = comp
    return out


def refitted_plans(refit, old: Manifest | None, old_root: Path, comp: Component, tmp: Path, graph: str,
                   log: Callable[[str], None]) -> list[PlanInfo]:  # fmt: skip
    """The existing bundle's refittable plan of `comp` for this machine, refitted from the staged graph (or none)."""
    from .refit import refit_plan

    previous = old.components[comp.name].plans if old is not None and comp.name in old.components else []
    plan = next((p for p in previous if Path(p.path).name == refit.plan_name and p.refittable and p.onnx_sha256 != graph), None)
    if plan is None:
        return []
    log(f"{comp.name}: refitting {plan.path} from the new graph")
    return [refit_plan(refit, plan, old_root / plan.path, tmp / comp.onnx, tmp / plan.path, comp.name, graph)]


def build_component_plan(build: TrtBuild, comp: Component, want: PlanInfo, tmp: Path, log: Callable[[str], None],
                         position: str) -> PlanInfo:  # fmt: skip
    """Build `want` from the component's staged ONNX and return its completed record."""
    from .engine import build_plan, read_plan_facts

    if comp.onnx is None:
        raise WanrtError(f"{comp.name}: no ONNX graph in the bundle to build a TensorRT plan from; rebuild it with --target all")
    shapes = "; ".join(f"{n} {lo}..{hi}" for n, (lo, _, hi) in want.profiles[0].shapes.items()) if want.profiles else "static"
    log(f"{position}: building the TensorRT plan (flags {', '.join(want.builder_flags) or 'none'}; opt level "
        f"{want.opt_level}; {shapes})")  # fmt: skip
    (tmp / want.path).parent.mkdir(parents=True, exist_ok=True)
    build_plan(build.session, comp.name, tmp / comp.onnx, tmp / want.path, want.builder_flags, build.options, want.profiles,
               plugin=want.plugin is not None)  # fmt: skip
    save_timing_cache(build.timing_cache_path, build.session.timing_cache)  # after every build: a later failure keeps it
    plan = with_facts(want, read_plan_facts(build.session, tmp / want.path, comp.name))
    log(f"{position}: built in {build.session.seconds[comp.name]:.0f} s ({(tmp / want.path).stat().st_size / 1e6:.1f} MB)")
    return plan
