"""`cli.py build-engine`: resolve a model, export each component, and write a verifiable bundle.

The steps are small and separate:

1. `resolve_model` reads headers only and describes the model (family, task, experts, companions);
2. `plan_components` decides which engines the bundle needs and what each is built from;
3. `export_component` exports one planned component with its kind's exporter (`EXPORTERS`, the
   modules of `export.onnx`) and lints the graph (`export.onnx.lint`);
4. `build_bundle` stages a new bundle beside the target, reuses every component whose cache key
   (source file digests + options + tool versions) matches the existing bundle's, exports the
   others, keeps the existing bundle's components that `--components`/`--expert` left out when
   a full build would reuse them, copies the tokenizer, writes the manifest, then swaps the
   staged folder into place.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import click

from wanrt.engines.digests import cached_sha256
from wanrt.export.trt.stage import ModelShape, TrtBuild, has_current_plan, intact, open_build, stage_plans
from wanrt.engines.errors import WanrtError
from wanrt.engines.manifest import (
    MANIFEST_NAME,
    Component,
    Manifest,
    is_bundle,
    read_manifest,
    staging_dir,
    write_manifest,
)
from wanrt.engines.model import VAEInfo
from wanrt.engines.signatures import EngineSignature
from wanrt.engines.vae_contract import check_vae_matches
from wanrt.export.onnx.component import ExportedComponent
from wanrt.export.trt.config import TrtOptions
from wanrt.export.versions import export_versions, package_versions
from wanrt.export.trt.stage import TARGETS

COMPONENT_GROUPS = ("dit", "text_encoder", "image_encoder", "vae")
PRECISIONS = ("fp32", "bf16")
TOKENIZER_DIR = "tokenizer"
# Why a component is built in another precision than the bundle's (component kind -> reason).
PRECISION_REASONS = {
    "vae_encoder": "ONNX Conv has no bfloat16 before opset 22, beyond TensorRT 10.1's ONNX parser (opsets 9-20)",
    "vae_decoder": "ONNX Conv has no bfloat16 before opset 22, beyond TensorRT 10.1's ONNX parser (opsets 9-20)",
    "image_encoder": "the official code runs the CLIP tower in fp16",
}


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked `build-engine` for."""

    precision: str = "fp32"
    components: tuple[str, ...] | None = None  # groups from COMPONENT_GROUPS; None = all the model needs
    experts: tuple[str, ...] | None = None  # restrict Wan2.2 A14B experts; None = all
    attention: str = "native"
    target: str = "onnx"
    lora_strict: bool = False
    force: bool = False
    trt: TrtOptions = TrtOptions()  # --target trt|all: how the plans are built (`export.trt.config`)
    sizes: str | None = None  # --sizes / --frames / --batch / --static: the plans' optimization profiles
    frames: str | None = None
    batch: str = "1-2"
    static: str | None = None
    quantize: str | None = None  # "int8" / "fp8": the DiT block linears (calibration.qdq)
    weights_only: bool = False  # W8A16: weight Q/DQ only, no activation calibration
    calibration: Any = None  # calibration.calibrate.CalibrationOptions (None: the defaults)
    quantize_text_encoder: str | None = None  # "int8" / "fp8": the umt5 block linears, weight-only (W8A16)
    quantize_attention: bool = False  # fp8 Q/DQ on the self-attentions' q, k, v and softmax output (attention_qdq)


@dataclass(frozen=True)
class Exporter:
    """How one component kind is exported: `function(source, out_dir, precision, **args, **options)`."""

    function: str  # "module:attribute" returning an ExportedComponent; imported when first called
    args: dict[str, Any] = field(default_factory=dict)

    def __call__(self, source: Any, out_dir: Path, precision: str, **options: Any) -> ExportedComponent:
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)(source, out_dir, precision, **self.args, **options)


# Component kind -> its exporter.  A new kind is one entry; a rewrite of the traced graph (Q/DQ, plugin
# nodes) is the exporters' `passes` option, given in an entry's args or a plan's export_options.
EXPORTERS: dict[str, Exporter] = {
    "dit": Exporter("wanrt.export.onnx.dit:export_dit_onnx"),
    "text_encoder": Exporter("wanrt.export.onnx.encoders:export_text_encoder_onnx"),
    "image_encoder": Exporter("wanrt.export.onnx.encoders:export_image_encoder_onnx"),
    "vae_encoder": Exporter("wanrt.export.onnx.vae:export_vae_onnx", {"part": "encoder"}),
    "vae_decoder": Exporter("wanrt.export.onnx.vae:export_vae_onnx", {"part": "decoder"}),
}


@dataclass
class ComponentPlan:
    """One engine to produce: its name, what it is built from, and the options of its kind's exporter."""

    name: str
    kind: str  # a key of EXPORTERS
    precision: str
    sources: list[Path]  # the files it is built from (their digests are in its cache key)
    source: Any  # what the exporter reads: a checkpoint view (DiT) or a companion file
    export_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the exporter
    expert: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # what else the cache key covers
    graph_key: str | None = None  # plans with one graph key share a graph (DiT experts of one architecture)
    quantization: Any = None  # calibration.qdq.WeightQuantReport of a quantized DiT (filled while it exports)


# --------------------------------------------------------------------------------------------
# source digests (remembered per file state so a rebuild does not re-read every weight)


def _versions() -> dict[str, str]:
    """What produced the bundle (the manifest's producer): the export versions, Python, and the runtime libraries."""
    return {**export_versions(), "python": platform.python_version(), **package_versions(("safetensors", "onnxruntime"))}


def cache_key(plan: ComponentPlan, loras: list[dict[str, Any]]) -> str:
    """Key of a component's files: its sources' digests, options, the LoRAs merged into it, tool versions."""
    digests = cached_sha256(list(plan.sources))
    payload = {
        "name": plan.name,
        "kind": plan.kind,
        "precision": plan.precision,
        "options": plan.options,
        "sources": [[p.name, digests[str(p)]] for p in plan.sources],
        "loras": [l for l in loras if not l["experts"] or plan.expert in l["experts"]] if plan.kind == "dit" else [],
        "versions": export_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# planning


def _missing(what: str, file_hint: str, task: str, model: Path) -> WanrtError:
    return WanrtError(f"{model}: no {what} found (expected {file_hint} beside the model); the {task} task needs it")


def vae_file_for(out_dim: int) -> str:
    """The official VAE file a DiT with `out_dim` latent channels needs (16: Wan2.1, 48: Wan2.2)."""
    from wanrt.export.checkpoint.companions import VAE_FILES, VAE_Z_DIMS

    version = VAE_Z_DIMS.get(out_dim)
    return VAE_FILES[version] if version else f"a VAE with {out_dim} latent channels"


def precision_notes(precision: str, components: list) -> list[str]:
    """One line per component (plan or manifest entry) built in another precision than `precision`, with why."""
    return [
        f"{c.name} is built in {c.precision}, not {precision}: {PRECISION_REASONS.get(c.kind, 'its exporter supports no other')}"
        for c in components
        if c.precision != precision
    ]


def plan_components(resolved, options: BuildOptions, loras: list) -> list[ComponentPlan]:
    """The engines a bundle of this model needs, restricted to what the user asked for."""
    from wanrt.export.checkpoint.companions import companion_files
    from wanrt.export.lora import apply_loras

    groups = set(options.components or COMPONENT_GROUPS)
    unknown = groups - set(COMPONENT_GROUPS)
    if unknown:
        raise WanrtError(f"--components: unknown {', '.join(sorted(unknown))}; expected any of {', '.join(COMPONENT_GROUPS)}")
    task, cfg = resolved.task, resolved.dit
    names = [e.name for e in resolved.experts]
    if options.experts:
        bad = [e for e in options.experts if e not in names]
        if bad:
            raise WanrtError(f"--expert {', '.join(bad)}: this model's DiT experts are {', '.join(names)}")
    plans: list[ComponentPlan] = []
    if "dit" in groups:
        lora_opts = {"strict": options.lora_strict}
        for expert in resolved.experts:
            if options.experts and expert.name not in options.experts:
                continue
            view = apply_loras(expert.view, loras, expert.name, strict=options.lora_strict) if loras else expert.view
            name = "dit" if expert.name == "dit" else f"dit_{expert.name}"
            plan_options = {"attention": options.attention, **lora_opts, "dit": cfg.to_dict()}
            plan = ComponentPlan(
                name, "dit", options.precision, list(expert.files), view, {"cfg": cfg, "attention": options.attention},
                expert=None if expert.name == "dit" else expert.name, options=plan_options,
                graph_key=json.dumps([options.precision, options.attention, cfg.to_dict()], sort_keys=True),
            )  # fmt: skip
            plans.append(quantized_plan(plan, options, calibration_sources(resolved)) if options.quantize else plan)
    if "text_encoder" in groups:
        if resolved.text_encoder is None:
            raise _missing("T5 text encoder", "models_t5_umt5-xxl-enc-bf16.pth", task, resolved.source)
        if resolved.tokenizer is None:
            raise _missing("tokenizer", "google/umt5-xxl/tokenizer.json", task, resolved.source)
        plan = ComponentPlan("text_encoder", "text_encoder", options.precision, companion_files(resolved.text_encoder),
                             resolved.text_encoder, {"task": task})  # fmt: skip
        plans.append(quantized_text_encoder_plan(plan, options.quantize_text_encoder) if options.quantize_text_encoder else plan)
    if "image_encoder" in groups and cfg.image_branch:
        if resolved.image_encoder is None:
            raise _missing("CLIP image encoder", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", task, resolved.source)
        clip_precision = "fp32" if options.precision == "fp32" else "fp16"  # the official code runs CLIP in fp16
        plans.append(
            ComponentPlan("image_encoder", "image_encoder", clip_precision, companion_files(resolved.image_encoder),
                          resolved.image_encoder, {"task": task})  # fmt: skip
        )
    if "vae" in groups:
        if resolved.vae is None:
            raise _missing("VAE", vae_file_for(cfg.out_dim), task, resolved.source)
        check_vae_matches(resolved.vae_version, cfg.out_dim, where=str(resolved.vae))
        parts = ["decoder"] + (["encoder"] if task in ("i2v", "flf2v", "ti2v", "vace", "animate") else [])  # vace/animate encode videos
        for part in parts:
            plans.append(ComponentPlan(f"vae_{part}", f"vae_{part}", "fp32", companion_files(resolved.vae), resolved.vae))
    if not plans:
        raise WanrtError(f"--components {','.join(sorted(groups))}: nothing to build for this {resolved.family} {task} model")
    return plans


def calibration_sources(resolved) -> list[Path]:
    """The companion files a calibration runs besides the DiT (text encoder, CLIP, VAE): their digests key its scales."""
    from wanrt.export.checkpoint.companions import companion_files

    return [f for c in (resolved.text_encoder, resolved.image_encoder, resolved.vae) if c is not None for f in companion_files(c)]


def quantized_plan(plan: ComponentPlan, options: BuildOptions, calib_sources: list[Path] = ()) -> ComponentPlan:
    """`plan` with its block linears quantized (`--quantize`): the weight Q/DQ pass, the options in its cache key.

    Quantized experts never share a graph: their weights' codes and scales, and their activation
    scales, are each expert's own.  A calibrated plan's cache key also covers `calib_sources`."""
    from wanrt.calibration.calibrate import CalibrationOptions, calibration_key
    from wanrt.calibration.qdq import WeightQuantReport, check_scheme, weight_qdq_pass

    check_scheme(options.quantize)
    report = WeightQuantReport(options.quantize)
    calib = None if options.weights_only else calibration_key(options.calibration or CalibrationOptions())
    return replace(
        plan, graph_key=None, quantization=report,
        sources=list(plan.sources) + ([] if options.weights_only else [p for p in calib_sources if p not in plan.sources]),
        export_options={**plan.export_options, "passes": [weight_qdq_pass(plan.source, options.quantize, report)]},
        options={**plan.options, "quantize": {"scheme": options.quantize, "weights_only": options.weights_only,
                                              "calibration": calib, **attention_key(options)}},
    )  # fmt: skip


def quantized_text_encoder_plan(plan: ComponentPlan, scheme: str) -> ComponentPlan:
    """`plan` with every umt5 block linear (attention q/k/v/o, FFN gate/fc1/fc2) as a weight-only Q/DQ
    (`--quantize-text-encoder`): int8 / fp8 codes and one scale per output channel, a LightX2V source's
    own codes passed through when they are in `scheme`."""
    from wanrt.calibration.qdq import WeightQuantReport, check_scheme, weight_qdq_pass
    from wanrt.export.checkpoint.encoder_quant import is_t5_linear, weight_view
    from wanrt.export.models.t5 import open_t5_checkpoint

    check_scheme(scheme)
    report = WeightQuantReport(scheme)
    _, reader = open_t5_checkpoint(plan.source)
    return replace(
        plan, quantization=report,
        export_options={**plan.export_options, "passes": [weight_qdq_pass(weight_view(reader), scheme, report, selects=is_t5_linear)]},
        options={**plan.options, "quantize": {"scheme": scheme, "weights_only": True}},
    )  # fmt: skip


def encoder_source_notes(plans: list[ComponentPlan]) -> list[str]:
    """One line per T5 / CLIP built from a LightX2V fp8/int8 file: dequantized, requantized, or its codes kept."""
    from wanrt.export.checkpoint.companions import read_companion

    notes = []
    for plan in plans:
        if plan.kind not in ("text_encoder", "image_encoder"):
            continue
        stored = getattr(read_companion(plan.source), "stored", None)
        scheme = plan.quantization.scheme if plan.quantization is not None else None
        if stored is None or stored == scheme:
            continue
        if scheme is None:
            keep = " (--quantize-text-encoder " + stored + " keeps its codes)" if plan.kind == "text_encoder" else ""
            notes.append(f"{plan.name}: {plan.source} stores {stored} linears; they are dequantized into the "
                         f"{plan.precision} graph{keep}")  # fmt: skip
        else:
            notes.append(f"{plan.name}: {plan.source} stores {stored} linears; --quantize-text-encoder {scheme} "
                         "requantizes them from their dequantized values")  # fmt: skip
    return notes
def attention_key(options: BuildOptions) -> dict[str, Any]:
    """The cache key's part for `--quantize-attention` (absent without it, so other keys stay as they were)."""
    if not options.quantize_attention:
        return {}
    from wanrt.calibration.attention_qdq import attention_options

    return {"attention": attention_options()}


def check_attention_options(options: BuildOptions) -> None:
    """`--quantize-attention` needs fp8 W8A8 and the native attention."""
    if not options.quantize_attention:
        return
    if options.quantize != "fp8":
        got = f"--quantize {options.quantize}" if options.quantize else "no --quantize"
        raise WanrtError(f"--quantize-attention needs --quantize fp8 (got {got}): TensorRT fuses fp8 attention only")
    if options.weights_only:
        raise WanrtError("--quantize-attention needs calibrated activations; it cannot be combined with --weights-only")
    if options.attention != "native":
        raise WanrtError(f"--quantize-attention quantizes the native attention, not --attention {options.attention}: "
                         "the plugin quantizes attention itself (--attention-precision fp8)")


def quantize_notes(plans: list[ComponentPlan]) -> list[str]:
    """One line per quantized DiT whose source stores its block linears in another 8-bit format (requantized)."""
    from wanrt.calibration.formats import FORMAT_OF_DTYPE

    notes = []
    for plan in plans:
        if plan.quantization is None:
            continue
        stored = FORMAT_OF_DTYPE.get(getattr(plan.source, "precision", ""))
        if stored is not None and stored != plan.quantization.scheme:
            notes.append(f"{plan.name}: the source stores {stored} block linears; --quantize {plan.quantization.scheme} "
                         "requantizes them from their dequantized values")  # fmt: skip
    return notes


def check_quantize_options(options: BuildOptions) -> None:
    """The --quantize family of options that cannot work together."""
    from wanrt.calibration.calibrate import CalibrationOptions

    if options.quantize is None:
        if options.weights_only or options.calibration is not None:
            raise WanrtError(f"{'--weights-only' if options.weights_only else '--calib-*'} needs --quantize int8|fp8")
        return
    from wanrt.calibration.qdq import check_scheme

    check_scheme(options.quantize)
    if options.weights_only and options.calibration is not None and options.calibration != CalibrationOptions():
        raise WanrtError("--calib-* options have no effect with --weights-only (W8A16 graphs are not calibrated)")
    if options.calibration is not None:
        options.calibration.check()


def check_text_encoder_quantize(options: BuildOptions) -> None:
    """`--quantize-text-encoder` names a scheme (with `--components` leaving the text encoder out, it says which
    existing one a full build would reuse, so that one is kept)."""
    from wanrt.calibration.qdq import SCHEMES

    scheme = options.quantize_text_encoder
    if scheme is not None and scheme not in SCHEMES:
        raise WanrtError(f"--quantize-text-encoder {scheme!r}: expected one of {', '.join(SCHEMES)}")


def quantization_attributes(plan: ComponentPlan) -> dict[str, Any]:
    """The manifest record of a quantized DiT's weights (its activations are added after calibration)."""
    report = plan.quantization
    return {"quantization": {
        "scheme": report.scheme, "weights": {"granularity": "per_channel", "symmetric": True, "axis": 1, **report.to_dict()},
        "activations": None,
    }}  # fmt: skip


def calibrate_staged(tmp: Path, manifest: Manifest, built: list[str], options: BuildOptions,
                     log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Calibrate the quantized experts built into the staged bundle `tmp` (W8A8), re-lint them; return the timing."""
    from wanrt.calibration.calibrate import CalibrationOptions, calibrate_bundle

    log(f"calibrating {', '.join(built)} ({options.quantize} activations)")
    result = calibrate_bundle(tmp, manifest, built, options.quantize, options.calibration or CalibrationOptions(), log,
                              attention=options.quantize_attention)  # fmt: skip
    for name in built:
        comp = manifest.components[name]
        lint_exported(name, tmp / comp.onnx, comp.signature)
        comp.attributes["quantization"]["activations"] = {"granularity": "per_tensor", "symmetric": True,
                                                          **result.records[name]}  # fmt: skip
    return {"seconds": round(result.seconds, 3), "prompts": result.prompts}


# --------------------------------------------------------------------------------------------
# building


def _reusable(old: Manifest | None, old_root: Path, plan: ComponentPlan, key: str) -> Component | None:
    """The existing bundle's component if it was built from the same inputs and its files are intact."""
    if old is None or plan.name not in old.components:
        return None
    comp = old.components[plan.name]
    return comp if comp.cache_key == key and intact(old, old_root, comp.files) else None


def unrequested_plans(
    resolved, options: BuildOptions, plans: list[ComponentPlan], old: Manifest, log: Callable[[str], None]
) -> list[ComponentPlan]:
    """What a full build would add to `plans` among the existing bundle's components (those `--components`/`--expert` left out).

    Planned without LoRAs: these plans are never exported, and `cache_key` takes the LoRA records separately.
    """
    if options.components is None and options.experts is None:
        return []
    names = {p.name for p in plans}
    others: list[ComponentPlan] = []
    for group in COMPONENT_GROUPS:
        if not any(group_of(c.kind) == group and c.name not in names for c in old.components.values()):
            continue
        try:
            full = plan_components(resolved, replace(options, components=(group,), experts=None), [])
        except WanrtError as e:
            log(f"{group}: the existing bundle's components are dropped: this model cannot plan them ({e})")
            continue
        others += [p for p in full if p.name not in names]
    return others


def export_component(plan: ComponentPlan, out_dir: Path, template: Path | None = None) -> ExportedComponent:
    """Export `plan` into its folder `out_dir` with its kind's exporter and lint the graph.

    `template`: the graph of a component with the same `graph_key`, written with this plan's weights instead of a new trace.
    """
    options = dict(plan.export_options)
    if template is not None:
        options["template"] = template
    exported = EXPORTERS[plan.kind](plan.source, out_dir, plan.precision, **options)
    lint_exported(plan.name, exported.graph, exported.signature)
    return exported


def lint_exported(name: str, onnx_path: Path, signature: EngineSignature) -> None:
    """Raise a WanrtError naming the component and its first problems unless the graph passes the TensorRT lint."""
    from wanrt.export.onnx.lint import lint_onnx

    problems = lint_onnx(onnx_path, signature)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise WanrtError(f"{name}: the exported graph {onnx_path} fails the TensorRT-compatibility lint: {'; '.join(problems[:3])}{more}")


def _carry_over(comp: Component, plan: ComponentPlan, old_root: Path, tmp: Path, graphs: dict[str, Path]) -> Component:
    """Link an existing bundle's component files into the staged bundle (and register its graph); return it."""
    for rel in comp.files:
        _link_or_copy(old_root / rel, tmp / rel)
    if plan.graph_key is not None and comp.onnx is not None:
        graphs[plan.graph_key] = tmp / comp.onnx
    return comp


def group_of(kind: str) -> str:
    """The `--components` group of a component kind (the VAE parts are one group)."""
    return "vae" if kind.startswith("vae_") else kind


def _component_rank(kind: str, name: str) -> tuple[int, str]:
    """Manifest order: DiT experts, text encoder, image encoder, VAE parts (by name within a group)."""
    group = group_of(kind)
    return COMPONENT_GROUPS.index(group) if group in COMPONENT_GROUPS else len(COMPONENT_GROUPS), name


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _read_old_manifest(output: Path) -> Manifest | None:
    if not is_bundle(output):
        return None
    try:
        return read_manifest(output)
    except WanrtError:
        return None  # an older schema or a damaged manifest: rebuild everything


def read_loras(resolved, lora_args: tuple[str, ...]) -> list:
    """The LoRAs to merge: the config's `lora_configs`, then `--lora` arguments, each checked against the experts."""
    from wanrt.export.lora import loras_from_config, parse_lora_arg

    loras = (loras_from_config(resolved.config, resolved.config_path) if resolved.config else []) + [
        _named_lora(parse_lora_arg(a), resolved.named_loras) for a in lora_args
    ]
    names = {e.name for e in resolved.experts}
    for spec in loras:
        if spec.expert is not None and spec.expert not in names:
            raise WanrtError(f"LoRA {spec.path}: targets expert {spec.expert!r} but this model's experts are {', '.join(sorted(names))}")
    return loras


def _named_lora(spec, named: dict[str, Path]):
    """`--lora NAME[:S]` for a LoRA the model ships (Animate's `relighting`) reads that file; a path stays a path."""
    if not spec.path.exists() and str(spec.path) in named:
        return replace(spec, path=named[str(spec.path)])
    return spec


def vae_info(resolved) -> VAEInfo:
    """The VAE of a resolved model (its version, else the DiT's output channels: 48 is Wan2.2's 16x VAE)."""
    return VAEInfo.for_version(resolved.vae_version or ("2.2" if resolved.dit.out_dim == 48 else "2.1"))


def model_shape(resolved) -> ModelShape:
    """What the optimization-profile rules need: the VAE stride, whether sampling uses CFG, the task."""
    s = resolved.sampling
    return ModelShape(vae_info(resolved).stride, s.enable_cfg and any(g != 1.0 for g in s.guide_scale), resolved.task)


def open_trt_build(resolved, options: BuildOptions, log: Callable[[str], None] = lambda msg: None) -> TrtBuild | None:
    """The TensorRT side of the build (`export.trt.stage.open_build`), or None for `--target onnx`."""
    from wanrt.export.trt.profiles import shape_request

    if options.target == "onnx":
        given = [n for n, v in (("--sizes", options.sizes), ("--frames", options.frames), ("--static", options.static)) if v]
        given += [f"--{f.name.replace('_dir', '').replace('_', '-')}" for f in fields(TrtOptions)
                  if getattr(options.trt, f.name) != f.default]  # fmt: skip
        if given:
            raise WanrtError(f"{given[0]}: a TensorRT build option; it needs --target trt or all")
        return None
    s = resolved.sampling
    request = shape_request(vae_info(resolved).stride, options.sizes, options.frames, options.batch, options.static,
                            (s.height, s.width), s.frames)  # fmt: skip
    return open_build(options.target, replace(options.trt, attention=options.attention), request,
                      options.precision, resolved.dit.head_dim, log)  # the DiT graph's attention dtype and head size


def bundle_manifest(resolved, model: str | os.PathLike, options: BuildOptions, components: dict[str, Component],
                    loras: list, tokenizer: str | None) -> Manifest:  # fmt: skip
    """The manifest of a bundle of `resolved` holding `components` (in manifest order)."""
    return Manifest(
        family=resolved.family,
        task=resolved.task,
        dit=resolved.dit,
        vae=vae_info(resolved),
        components=dict(sorted(components.items(), key=lambda item: _component_rank(item[1].kind, item[0]))),
        sampling=resolved.sampling,
        precision=options.precision,
        tokenizer=tokenizer,
        loras=loras,
        source={
            "model": str(Path(model).absolute()),
            "config": str(resolved.config_path) if resolved.config_path else None,
            "experts": {e.name: {"layout": e.layout, "precision": e.view.precision, "files": [str(f) for f in e.files]}
                        for e in resolved.experts},  # fmt: skip
        },
        producer=_versions(),
    )


def lora_notes(plans: list[ComponentPlan]) -> list[str]:
    """The LoRA merge reports' notes of every planned DiT (each once, in order): what differs from LightX2V."""
    notes: dict[str, None] = {}
    for plan in plans:
        report = getattr(plan.source, "report", None)
        for match in report.loras if report is not None else []:
            notes.update(dict.fromkeys(match.notes))
    return list(notes)


def build_bundle(
    model: str | os.PathLike,
    output: str | os.PathLike,
    config: str | os.PathLike | None = None,
    lora_args: tuple[str, ...] = (),
    options: BuildOptions = BuildOptions(),
    log: Callable[[str], None] = lambda msg: click.echo(msg, err=True),
    refit: Any = None,
) -> tuple[Manifest, dict[str, str], list[str]]:
    """Build (or update) the bundle at `output`; return its manifest, what happened to each component, and the notes.

    `refit` (`export.trt.refit.RefitSession`): refittable plans of changed graphs are refitted, not dropped (`cli.py refit`)."""
    from wanrt.export.checkpoint.resolve import resolve_model
    from wanrt.export.lora import lora_records

    if options.precision not in PRECISIONS:
        raise WanrtError(f"--precision {options.precision!r}: expected one of {', '.join(PRECISIONS)} "
                         "(fp8/int8 engines come with calibrated Q/DQ export)")  # fmt: skip
    if options.target not in TARGETS:
        raise WanrtError(f"--target {options.target!r}: expected one of {', '.join(TARGETS)}")
    check_quantize_options(options)
    check_text_encoder_quantize(options)
    check_attention_options(options)
    output = Path(output)
    resolved = resolve_model(model, config)
    loras = read_loras(resolved, lora_args)
    records = lora_records(loras)
    lora_keys = [{"sha256": r.sha256, "strength": r.strength, "experts": r.experts, "alpha": r.alpha} for r in records]
    plans = plan_components(resolved, options, loras)
    notes = precision_notes(options.precision, plans)
    for note in notes:
        log(f"note: {note}")
    for note in quantize_notes(plans) + encoder_source_notes(plans):
        log(f"note: {note}")
        notes.append(note)
    notes += lora_notes(plans)  # printed as the merge planned them
    trt_build = open_trt_build(resolved, options, log)  # before anything is written: TensorRT, the GPU, the shapes
    shape = model_shape(resolved)
    old = _read_old_manifest(output)
    outcome: dict[str, str] = {}
    components: dict[str, Component] = {}
    graphs: dict[str, Path] = {}  # graph key -> a graph already in the staged bundle
    with staging_dir(output, force=options.force) as tmp:
        for plan in unrequested_plans(resolved, options, plans, old, log) if old is not None else []:
            if plan.name not in old.components:
                continue
            kept = _reusable(old, output, plan, cache_key(plan, lora_keys))
            if kept is None:
                log(f"{plan.name}: not requested; the existing one was built from other inputs, so it is dropped")
                continue
            components[plan.name] = _carry_over(kept, plan, output, tmp, graphs)
            outcome[plan.name] = "kept"
            log(f"{plan.name}: not requested, kept from the existing bundle")
        for i, plan in enumerate(plans, 1):
            key = cache_key(plan, lora_keys)
            reused = _reusable(old, output, plan, key)
            if reused is not None and reused.onnx is None and (trt_build is None or trt_build.keeps_onnx
                                                               or not has_current_plan(reused, trt_build, shape)):
                reused = None  # a plan-only component, and a graph is needed: export it again
            if reused is not None:
                components[plan.name] = _carry_over(reused, plan, output, tmp, graphs)
                outcome[plan.name] = "reused"
                log(f"[{i}/{len(plans)}] {plan.name}: unchanged, reused")
                continue
            template = graphs.get(plan.graph_key) if plan.graph_key is not None else None
            shared = f", graph shared with {template.parent.name}" if template is not None else ""
            what = plan.precision
            if plan.quantization is not None:
                w8a16 = options.weights_only or plan.kind != "dit"
                what = f"{plan.quantization.scheme} {'W8A16' if w8a16 else 'W8A8'}, {plan.precision} elsewhere"
            log(f"[{i}/{len(plans)}] {plan.name}: exporting ({what}{shared})")
            exported = export_component(plan, tmp / plan.name, template)
            if plan.graph_key is not None:
                graphs[plan.graph_key] = exported.graph
            components[plan.name] = exported.manifest_entry(plan.name, plan.kind, plan.precision, tmp,
                                                            expert=plan.expert, cache_key=key)  # fmt: skip
            if plan.quantization is not None:
                components[plan.name] = replace(components[plan.name], precision=plan.quantization.scheme,
                                                attributes=quantization_attributes(plan))  # fmt: skip
            outcome[plan.name] = "built"
        tokenizer = None
        if resolved.tokenizer is not None and any(c.kind == "text_encoder" for c in components.values()):
            shutil.copytree(resolved.tokenizer, tmp / TOKENIZER_DIR)
            tokenizer = TOKENIZER_DIR
        built_quantized = [p.name for p in plans if p.quantization is not None and p.kind == "dit" and outcome.get(p.name) == "built"]
        if built_quantized and not options.weights_only:  # before any TensorRT plan is built from the graphs
            staged = bundle_manifest(resolved, model, options, components, records, tokenizer)
            calibrate_staged(tmp, staged, built_quantized, options, log)  # records into the components' attributes
        components = stage_plans(trt_build, components, old, output, tmp, shape, log, _link_or_copy, {p.name for p in plans},
                                 refit)  # fmt: skip
        manifest = bundle_manifest(resolved, model, options, components, records, tokenizer)
        write_manifest(tmp, manifest)
    return manifest, outcome, notes


@click.command("build-engine")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Bundle folder to write (replaced atomically); may be an empty folder.")
@click.option("--config", type=click.Path(), help="LightX2V JSON config (checkpoint keys, LoRAs, sampling defaults).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH][@EXPERT]", help="LoRA to merge (repeatable).")
@click.option("--lora-strict", is_flag=True, help="Any LoRA key that matches no base weight is an error.")
@click.option("--precision", default="fp32", show_default=True,
              help="Engine precision: fp32 or bf16 (at bf16 the VAE stays fp32 and CLIP runs fp16; a note says why).")
@click.option("--components", default=None,
              help="Comma list of dit,text_encoder,image_encoder,vae (default: all the model needs). Components of an "
                   "existing bundle at OUTPUT that are left out are kept when a full build would reuse them, else dropped.")
@click.option("--expert", "experts", multiple=True,
              help="Only these Wan2.2 experts (high_noise, low_noise); other components are kept as with --components.")
@click.option("--attention", type=click.Choice(["native", "plugin"]), default="native", show_default=True,
              help="Attention as standard ONNX ops, or as our TensorRT plugin op.")  # fmt: skip
@click.option("--target", type=click.Choice(TARGETS), default="onnx", show_default=True,
              help="onnx: ONNX graphs; trt: TensorRT plans for this GPU (the ONNX is exported, built from, then dropped); "
                   "all: both.")  # fmt: skip
@click.option("--sizes", default=None, metavar="480p,720p,WxH",
              help="Sizes the plans take (480p = 480x832 and 832x480, 720p = 720x1280 and 1280x720); the first is opt. "
                   "Default: the model's default size.")  # fmt: skip
@click.option("--frames", default=None, metavar="N[,N...]", help="Frame counts (4k+1) the plans take; default the model's.")
@click.option("--batch", default="1-2", show_default=True, metavar="MIN-MAX", help="DiT/text-encoder batch (2: CFG in one call).")
@click.option("--static", default=None, metavar="WxHxF", help="Build plans for this one shape only (e.g. 832x480x81).")
@click.option("--opt-level", type=int, default=3, show_default=True, help="TensorRT builder optimization level 0-5.")
@click.option("--version-compatible", is_flag=True,
              help="VERSION_COMPATIBLE + EXCLUDE_LEAN_RUNTIME plans: later TensorRT of the same major runs them, "
                   "with only the tensorrt-lean package.")  # fmt: skip
@click.option("--refittable", is_flag=True, help="REFIT DiT plans: `cli.py refit BUNDLE --lora ...` swaps LoRA weights in.")
@click.option("--strip-plan", is_flag=True, help="With --refittable and --target all: DiT plans without weights (taken from the ONNX at load).")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="TensorRT timing cache file (default: one per TensorRT version and GPU in the wanrt cache folder).")
@click.option("--plugin", "plugin_dir", type=click.Path(), default=None,
              help="With --attention plugin: the folder `plugin-build` wrote (default: compile this GPU's kernels into the wanrt cache).")
@click.option("--attention-precision", type=click.Choice(["bf16", "fp8", "int8"]), default="bf16", show_default=True,
              help="With --attention plugin: QK^T in the input dtype, fp8 e4m3 (sm_89+) or int8 (SageAttention-style, smoothed K).")
@click.option("--quantize", type=click.Choice(["int8", "fp8"]), default=None,
              help="Quantize every DiT block linear (attention q/k/v/o, image k/v, FFN) per output channel: explicit "
                   "Q/DQ graphs. Weights and activations (W8A8, calibrated) unless --weights-only.")
@click.option("--weights-only", is_flag=True, help="With --quantize: weight Q/DQ only (W8A16), no calibration.")
@click.option("--quantize-text-encoder", default=None, metavar="int8|fp8",
              help="Weight-only (W8A16) umt5 text encoder: every block linear as int8/fp8 codes, one scale per output "
                   "channel (a LightX2V quantized T5 of the same scheme passes its codes through).")
@click.option("--quantize-attention", is_flag=True,
              help="With --quantize fp8: also fp8 Q/DQ on the self-attentions' q, k, v (calibrated) and softmax output "
                   "(fixed scale 1/448), placed for TensorRT's fused fp8 attention.")
@click.option("--calib-prompts", type=click.Path(), default=None,
              help="Calibration prompts, one per line (default: the built-in set of varied prompts).")
@click.option("--calib-steps", type=int, default=None, help="Sampling steps per calibration prompt (default: the bundle's).")
@click.option("--calib-method", type=click.Choice(["max", "percentile"]), default=None,
              help="Activation range: running max of |x| (default), or a percentile of |x| per call.")
@click.option("--calib-percentile", type=float, default=None, help="With --calib-method percentile: P in (0, 100] (default 99.99).")
@click.option("--calib-size", default=None, metavar="WxH[xF]",
              help="Calibration video size (default: the bundle's default size, 5 frames).")
@click.option("--force", is_flag=True, help="Replace OUTPUT even if it is not a wanrt bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def build_engine_command(model, output, config, loras, lora_strict, precision, components, experts, attention, target, sizes,
                         frames, batch, static, opt_level, version_compatible, refittable, strip_plan, timing_cache,
                         plugin_dir, attention_precision, quantize, weights_only, quantize_text_encoder, quantize_attention, calib_prompts, calib_steps,
                         calib_method, calib_percentile,
                         calib_size, force, as_json):  # fmt: skip
    """Export MODEL's components to ONNX (and TensorRT plans) and write a verifiable bundle at OUTPUT."""
    trt_options = TrtOptions(opt_level=opt_level, version_compatible=version_compatible, refittable=refittable,
                             strip_plan=strip_plan, timing_cache=Path(timing_cache) if timing_cache else None,
                             plugin_dir=Path(plugin_dir) if plugin_dir else None,
                             attention_precision=attention_precision)  # fmt: skip
    from wanrt.calibration.calibrate import CalibrationOptions, parse_size

    calib_args = (calib_prompts, calib_steps, calib_method, calib_percentile, calib_size)
    calibration = None
    if any(a is not None for a in calib_args):
        calibration = CalibrationOptions(method=calib_method or "max", percentile=calib_percentile, prompts_file=calib_prompts,
                                         steps=calib_steps, size=parse_size(calib_size) if calib_size else None)  # fmt: skip
    options = BuildOptions(
        precision=precision,
        components=tuple(c.strip() for c in components.split(",") if c.strip()) if components else None,
        experts=tuple(experts) or None,
        attention=attention,
        target=target,
        lora_strict=lora_strict,
        force=force,
        trt=trt_options,
        sizes=sizes,
        frames=frames,
        batch=batch,
        static=static,
        quantize=quantize,
        weights_only=weights_only,
        calibration=calibration,
        quantize_text_encoder=quantize_text_encoder,
        quantize_attention=quantize_attention,
    )
    manifest, outcome, notes = build_bundle(model, output, config, loras, options)
    summary = {
        "bundle": str(output),
        "family": manifest.family,
        "task": manifest.task,
        "precision": manifest.precision,
        "components": {n: {"status": outcome[n], "onnx": c.onnx, "precision": c.precision, "plans": [p.path for p in c.plans],
                           **({"quantization": c.attributes["quantization"]} if "quantization" in c.attributes else {})}
                       for n, c in manifest.components.items()},  # fmt: skip
        "loras": [vars(r) for r in manifest.loras],
        "bytes": sum(f["size"] for f in manifest.files.values()),
        "notes": notes,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        counts = ", ".join(f"{status} {list(outcome.values()).count(status)}" for status in ("built", "reused", "kept"))
        click.echo(
            f"{output}: {manifest.family} {manifest.task} bundle with {', '.join(manifest.components)}"
            f" ({summary['bytes'] / 1e6:.1f} MB; {counts}{plan_count(manifest)}); manifest {Path(output) / MANIFEST_NAME}"
        )


def plan_count(manifest: Manifest) -> str:
    """", 5 TensorRT plans" for the summary line ("" when the bundle holds none)."""
    n = sum(len(c.plans) for c in manifest.components.values())
    return f", {n} TensorRT plan{'s' if n != 1 else ''}" if n else ""
