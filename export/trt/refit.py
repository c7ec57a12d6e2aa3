"""`cli.py refit BUNDLE --lora FILE[:STRENGTH][@EXPERT]`: new LoRA weights into refittable DiT plans, without a rebuild.

The bundle is rebuilt as `build-engine` would with the bundle's LoRAs plus the new ones: every
component whose inputs did not change is reused, the DiT experts the new LoRAs touch get their
LoRA-merged ONNX exported again, and their plans for this GPU and TensorRT are refitted from it
(`trt.Refitter` + `trt.OnnxParserRefitter`, then serialized again) instead of built.  The new
manifest (LoRA records, file hashes, the plans' graph digests) replaces the old one together with
the files, through the bundle's staging folder: an interrupted refit leaves the old bundle.

A stripped plan (STRIP_PLAN) holds no weights: its file stays as it is, and it takes the new
weights from the new ONNX at every load.  Refit needs the bundle's ONNX (built with `--target
all --refittable`): the refitter reads the merged weights from it, and a stripped plan at load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import atomic_output
from wanrt.engines.manifest import Manifest, verify_bundle
from wanrt.engines.model import LoraRecord
from wanrt.engines.plans import PlanInfo, plan_file_name
from wanrt.runtime.backends.tensorrt import LogBook, make_logger, plan_reader
from wanrt.runtime.backends.tensorrt_refit import refit_from_onnx

from .api import serialization_config
from .cache import plan_cache_key


class RefitError(WanrtError):
    """The bundle's plans cannot take the LoRA by refitting; the message says which plan and why."""


@dataclass
class RefitSession:
    """The full TensorRT (its refitter) and this GPU."""

    trt: Any
    logger: "trt.ILogger"
    book: LogBook
    tensorrt_version: str
    compute_capability: str

    @property
    def plan_name(self) -> str:
        """The file name of this machine's plans (`engines.plans.plan_file_name`)."""
        return plan_file_name(self.tensorrt_version, self.compute_capability)


def open_refit(what: str = "refit") -> RefitSession:
    """TensorRT and the GPU to refit on; TensorRTUnavailable naming what is missing."""
    from .api import build_gpu, import_tensorrt

    trt = import_tensorrt(what)
    gpu = build_gpu(what)
    book = LogBook()
    return RefitSession(trt, make_logger(trt, book), book, str(trt.__version__), gpu.compute_capability)


def previous_lora_args(manifest: Manifest, config_paths: set[str]) -> list[str]:
    """The bundle's `--lora` arguments (its LoRA records less those its LightX2V config names), oldest first."""
    args = []
    for record in manifest.loras:
        if record.path in config_paths:
            continue
        experts = record.experts or [None]
        args += [f"{record.path}:{record.strength!r}" + (f"@{e}" if e else "") for e in experts]
    return args


def check_unchanged(records: list[LoraRecord], digests: dict[str, str]) -> None:
    """RefitError when a LoRA file the bundle merged now has another sha256 (or is gone)."""
    for record in records:
        now = digests.get(record.path)
        if now != record.sha256:
            state = "is gone" if now is None else "has changed"
            raise RefitError(f"LoRA {record.path} {state} since the bundle was built (sha256 {record.sha256[:12]}...); "
                             "rebuild with build-engine instead")  # fmt: skip


def refit_targets(manifest: Manifest, experts: list[str | None]) -> list[str]:
    """The DiT components the new LoRAs touch (`None`: every expert); RefitError unless each can be refitted."""
    dits = {name: c for name, c in manifest.components.items() if c.kind == "dit"}
    names = [n for n, c in dits.items() if any(e is None or c.expert == e for e in experts)]
    if not names:
        raise RefitError(f"--lora targets expert(s) {', '.join(sorted(e for e in experts if e))}; the bundle's DiT "
                         f"components are {', '.join(dits) or 'none'}")  # fmt: skip
    for name in names:
        comp = dits[name]
        if comp.onnx is None:
            raise RefitError(f"{name}: the bundle keeps no ONNX graph to refit from (built with --target trt); "
                             "rebuild it with build-engine --target all --refittable")  # fmt: skip
        if not any(p.refittable for p in comp.plans):
            have = ", ".join(p.path for p in comp.plans) or "no TensorRT plan"
            raise RefitError(f"{name}: {have} is not refittable; rebuild with build-engine --target trt|all --refittable "
                             "(or without plans, build-engine --lora merges it)")  # fmt: skip
    return names


def check_plans_here(manifest: Manifest, names: list[str], plan_name: str) -> None:
    """RefitError unless each component has a refittable plan for this GPU and TensorRT (`plan_name`), before anything changes."""
    for name in names:
        plans = manifest.components[name].plans
        if not any(Path(p.path).name == plan_name and p.refittable for p in plans):
            have = ", ".join(Path(p.path).name for p in plans if p.refittable)
            raise RefitError(f"{name}: no refittable plan for this GPU and TensorRT ({plan_name}); the bundle has {have}: "
                             "refit on the machine that built it, or build this one with build-engine --refittable")  # fmt: skip


def refit_plan(session: RefitSession, plan: PlanInfo, old_path: Path, onnx_path: Path, new_path: Path, name: str,
               graph_sha256: str) -> PlanInfo:  # fmt: skip
    """Refit the plan at `old_path` from `onnx_path` into `new_path` (atomically); its record for the new graph."""
    if plan.stripped:
        new_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(new_path) as tmp:  # no weights in it: the new ONNX gives them at load
            tmp.write_bytes(old_path.read_bytes())
    else:
        trt = session.trt
        runtime = trt.Runtime(session.logger)
        runtime.engine_host_code_allowed = True  # its own bundle's plan, sha256-verified by verify_bundle
        with open(old_path, "rb") as file:
            engine: "trt.ICudaEngine" = runtime.deserialize_cuda_engine(plan_reader(trt, file))
        if engine is None:
            raise RefitError(f"{name}: {old_path} does not deserialize: {'; '.join(session.book.errors[-3:]) or 'no error reported'}")
        refit_from_onnx(trt, engine, session.logger, session.book, onnx_path, name)
        config = serialization_config(trt, engine, plan.lean_runtime_excluded)
        host = engine.serialize_with_config(config) if config is not None else engine.serialize()
        new_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(new_path) as tmp:
            tmp.write_bytes(memoryview(host))
    return replace(plan, onnx_sha256=graph_sha256, cache_key=plan_cache_key(graph_sha256, plan.build_key))


def refit_bundle(bundle: str | Path, lora_args: tuple[str, ...], log=lambda msg: click.echo(msg, err=True)) -> tuple[Manifest, list[str]]:
    """Refit the bundle's DiT plans with the new LoRAs (see the module docstring); its new manifest and the refitted names."""
    from wanrt.engines.digests import cached_sha256
    from wanrt.export.build import BuildOptions, build_bundle, group_of
    from wanrt.export.lora import parse_lora_arg

    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    specs = [parse_lora_arg(a) for a in lora_args]
    targets = refit_targets(manifest, [s.expert for s in specs])
    existing = [Path(r.path) for r in manifest.loras if Path(r.path).is_file()]
    check_unchanged(manifest.loras, cached_sha256(existing))
    session = open_refit()
    check_plans_here(manifest, targets, session.plan_name)
    source = manifest.source or {}
    config = source.get("config")
    config_paths: set[str] = set()
    if config:
        from wanrt.export.checkpoint.lightx2v_config import read_json
        from wanrt.export.lora import loras_from_config

        config_paths = {str(s.path) for s in loras_from_config(read_json(config, "LightX2V config"), config)}
    attention = next((p.attention for c in manifest.components.values() for p in c.plans if c.kind == "dit"), "native")
    options = BuildOptions(precision=manifest.precision, attention=attention, target="onnx",
                           components=tuple(dict.fromkeys(group_of(c.kind) for c in manifest.components.values())))  # fmt: skip
    new, _, _ = build_bundle(source["model"], bundle, config, (*previous_lora_args(manifest, config_paths), *lora_args),
                                options, log=log, refit=session)  # fmt: skip
    return new, targets


@click.command("refit")
@click.argument("bundle", type=click.Path())
@click.option("--lora", "loras", multiple=True, required=True, metavar="PATH[:STRENGTH][@EXPERT]",
              help="LoRA to add to the bundle's DiT plans (repeatable).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def refit_command(bundle, loras, as_json):
    """Swap LoRA-merged weights into BUNDLE's refittable TensorRT plans (no rebuild)."""
    manifest, refitted = refit_bundle(bundle, loras)
    summary = {"bundle": str(bundle), "refitted": refitted, "loras": [vars(r) for r in manifest.loras]}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{bundle}: refitted {', '.join(refitted)} with {len(loras)} LoRA(s); "
                   f"the bundle now merges {len(manifest.loras)}")  # fmt: skip
