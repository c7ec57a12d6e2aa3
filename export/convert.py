"""`cli.py convert`: merge LoRAs and (re)quantize one DiT expert into a single LightX2V-layout safetensors file.

Output layout (LightX2V `tools/convert`, see shared/reference/lightx2v-formats.md §1):
- bare official key names; every tensor bf16 except the quantized block linears;
- `--quantize fp8`: block linears (self_attn, cross_attn, ffn) as float8_e4m3fn with a float32
  per-output-channel `<layer>.weight_scale` [out, 1] = amax/448; `--quantize int8`: int8, amax/127;
- `--comfyui`: ComfyUI's per-tensor float32 `<layer>.scale_weight` (a scalar) plus the `scaled_fp8` marker.
Without `--quantize`, an fp8/int8 source keeps its format (LoRAs are merged by dequantize, merge,
requantize); `--quantize bf16` dequantizes everything.  Tensors stream one at a time into a
temporary file that is renamed onto OUT at the end; the metadata records sources and LoRAs.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from wanrt.calibration.weights import ERROR_ROW_STRIDE, STORAGE_TO_FORMAT, QuantErrorSummary, quantize_measured
from wanrt.engines.errors import WanrtError
from wanrt.engines.digests import cached_sha256
from wanrt.export.checkpoint.safetensors_file import ITEMSIZE
from wanrt.export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec
from wanrt.export.checkpoint.resolve import CONVERT_METADATA_KEY, Expert, ResolvedModel, resolve_model
from wanrt.export.checkpoint.view import is_block_linear
from wanrt.export.lora import LoraSpec, apply_loras, lora_records, loras_from_config, normalize_expert, parse_lora_arg
from wanrt.export.lora.merge import MergedRef, MergedView

QUANTIZE_CHOICES = ("fp8", "int8", "bf16")
FORMAT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
COMFYUI_MARKER = "scaled_fp8"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass
class ConvertResult:
    """What a conversion wrote, for the summary line and `--json`."""

    output: Path
    source: str
    expert: str
    quantize: str | None
    layout: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    loras: list[dict[str, Any]] = field(default_factory=list)
    quantization_error: dict[str, Any] | None = None
    requantization_error: dict[str, Any] | None = None
    dropped_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["output"] = str(self.output)
        d["dropped_keys"] = len(self.dropped_keys)
        return d


def select_expert(experts: list[Expert], expert: str | None, src: Path) -> Expert:
    """The expert to convert: `--expert` for Wan2.2 MoE models, the only one otherwise."""
    names = [e.name for e in experts]
    if expert is None:
        if len(experts) == 1:
            return experts[0]
        raise WanrtError(f"{src}: a Wan2.2 MoE model with experts {', '.join(names)}; choose one with --expert")
    expert = normalize_expert(expert, "--expert")
    if names == ["dit"]:
        raise WanrtError(f"{src}: --expert {expert}: this model has a single DiT, not high/low-noise experts")
    for e in experts:
        if e.name == expert:
            return e
    raise WanrtError(f"{src}: no {expert} expert (has {', '.join(names)})")


@dataclass(frozen=True)
class OutputTensor:
    """How one official tensor is written: target dtype and, for quantized weights, its scale key/layout."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fmt: str | None = None  # "fp8" / "int8" when quantized
    scale_key: str | None = None
    scale_shape: tuple[int, ...] = ()


def plan_output(view: Mapping[str, Any], quantize: str | None, comfyui: bool) -> list[OutputTensor]:
    """Decide each tensor's output dtype (bf16, or fp8/int8 + scale for block linears)."""
    plan = []
    for key in sorted(view):
        ref = view[key]
        fmt = None
        if is_block_linear(key) and len(ref.shape) == 2:
            if quantize in FORMAT_DTYPES:
                fmt = quantize
            elif quantize is None:
                fmt = STORAGE_TO_FORMAT.get(ref.dtype)  # fp8_e4m3 / int8 (resolve_model refuses other quantized dtypes)
        if fmt is None:
            plan.append(OutputTensor(key, torch.bfloat16, tuple(ref.shape)))
            continue
        stem = key[: -len(".weight")]
        if comfyui:
            plan.append(OutputTensor(key, FORMAT_DTYPES[fmt], tuple(ref.shape), fmt, stem + ".scale_weight", ()))
        else:
            plan.append(OutputTensor(key, FORMAT_DTYPES[fmt], tuple(ref.shape), fmt, stem + ".weight_scale", (ref.shape[0], 1)))
    return plan


def _specs(plan: list[OutputTensor], comfyui: bool) -> list[TensorSpec]:
    specs = []
    for o in plan:
        specs.append(TensorSpec(o.key, o.dtype, o.shape))
        if o.scale_key:
            specs.append(TensorSpec(o.scale_key, torch.float32, o.scale_shape))
    if comfyui:
        specs.append(TensorSpec(COMFYUI_MARKER, torch.float8_e4m3fn, (2,)))
    return specs


def _real(ref: Any, dtype: torch.dtype) -> torch.Tensor:
    """The real-valued tensor in `dtype`; a LoRA-patched fp8/int8 weight skips requantization to its stored format."""
    if isinstance(ref, MergedRef) and ref.quantized:
        return ref.merged_fp32().to(dtype)
    return ref.load(dtype)


def _quantized_tensor(ref: Any, o: OutputTensor, layout: str, errors: QuantErrorSummary) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scale) of one block linear in the target format and layout."""
    stored_fmt = STORAGE_TO_FORMAT.get(ref.dtype)
    same_layout = stored_fmt == o.fmt and getattr(ref, "scale_layout", None) == layout
    if same_layout:
        # unpatched: copy codes and scales as they are (lossless); patched: MergedRef requantizes
        q, scale = ref.load_stored()
    else:
        q, scale, err = quantize_measured(_real(ref, torch.float32), o.fmt, layout, overwrite=True, row_stride=ERROR_ROW_STRIDE)
        errors.add(o.key, err)
    return q, scale.to(torch.float32).reshape(o.scale_shape)


def _stream(
    writer: SafetensorsWriter, view: Mapping[str, Any], plan: list[OutputTensor], layout: str, errors: QuantErrorSummary, bar: tqdm
) -> None:
    """Write every planned tensor; a worker computes the next one while this thread writes the last.

    Torch ops and `pwrite` both release the GIL, so reading/merging/quantizing overlaps writing;
    at most two output tensors are held at once.
    """

    def produce(o: OutputTensor) -> list[tuple[str, torch.Tensor]]:
        ref = view[o.key]
        if o.fmt is None:
            return [(o.key, _real(ref, torch.bfloat16))]
        q, scale = _quantized_tensor(ref, o, layout, errors)
        return [(o.key, q), (o.scale_key, scale)]

    def write(item: tuple[OutputTensor, Future]) -> None:
        o, future = item
        for key, tensor in future.result():
            writer.write(key, tensor)
        bar.update(_stored_bytes(view[o.key]))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanrt-convert") as pool:
        pending: deque[tuple[OutputTensor, Future]] = deque()
        for o in plan:
            pending.append((o, pool.submit(produce, o)))
            if len(pending) > 1:
                write(pending.popleft())
        while pending:
            write(pending.popleft())


def _metadata(
    src: Path,
    model: ResolvedModel,
    chosen: Expert,
    loras: list[LoraSpec],
    quantize: str | None,
    layout: str,
    hash_sources: bool,
) -> dict[str, str]:
    """The output's safetensors metadata: sources, the expert/family/task it holds, quantization and LoRAs."""
    files = getattr(chosen.view, "files", None) or []
    sources = []
    for f in files:
        entry: dict[str, Any] = {"path": str(f), "size": Path(f).stat().st_size}
        if hash_sources:
            entry["sha256"] = cached_sha256([f])[str(f)]
        sources.append(entry)
    info = {
        "tool": "wanrt convert",
        "source": str(src),
        "source_files": sources,
        "expert": model.moe_expert(chosen) or chosen.name,
        "family": model.family,
        "task": model.task,
        "quantize": quantize,
        "scale_layout": layout,
        "loras": [vars(r) for r in lora_records(loras)],
    }
    return {"format": "pt", CONVERT_METADATA_KEY: json.dumps(info, sort_keys=True)}


def convert_checkpoint(
    src: str | Path,
    output: str | Path,
    config: str | Path | None = None,
    loras: list[LoraSpec] | None = None,
    quantize: str | None = None,
    comfyui: bool = False,
    expert: str | None = None,
    strict: bool = False,
    hash_sources: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Write one expert of SRC, with `loras` merged and block linears (re)quantized, to OUTPUT."""
    t0 = time.perf_counter()
    src, output = Path(src), Path(output)
    if output.suffix != ".safetensors":
        raise WanrtError(f"{output}: the output must be a .safetensors file")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise WanrtError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
    if comfyui and quantize != "fp8":
        raise WanrtError("--comfyui writes ComfyUI's scaled-fp8 layout; it needs --quantize fp8")
    model = resolve_model(src, config)
    chosen = select_expert(model.experts, expert, src)
    all_loras = (loras_from_config(model.config, model.config_path) if model.config else []) + list(loras or [])
    view: Mapping[str, Any] = apply_loras(chosen.view, all_loras, chosen.name, strict) if all_loras else chosen.view
    used = [s for s in all_loras if s.expert in (None, chosen.name)]
    layout = "per_tensor" if comfyui else "per_channel"
    plan = plan_output(view, quantize, comfyui)
    metadata = _metadata(src, model, chosen, used, quantize, layout, hash_sources)
    errors = QuantErrorSummary()
    total_in = sum(_stored_bytes(view[o.key]) for o in plan)

    desc = f"convert {chosen.name}"
    with tqdm(total=total_in, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=not progress) as bar:
        with SafetensorsWriter(output, _specs(plan, comfyui), metadata) as writer:
            _stream(writer, view, plan, layout, errors, bar)
            if comfyui:
                writer.write(COMFYUI_MARKER, torch.zeros(2, dtype=torch.float8_e4m3fn))
    report = view.report if isinstance(view, MergedView) else None
    return ConvertResult(
        output=output,
        source=str(src),
        expert=chosen.name,
        quantize=quantize,
        layout=layout if any(o.fmt for o in plan) else "none",
        tensors=len(plan),
        bytes_read=total_in,
        bytes_written=output.stat().st_size,
        seconds=time.perf_counter() - t0,
        loras=[m.to_dict() for m in report.loras] if report else [],
        quantization_error=errors.to_dict() if errors.tensors else None,
        requantization_error=report.requant.to_dict() if report and report.requant_errors else None,
        dropped_keys=list(getattr(chosen.view, "unknown_keys", [])),
    )


def keep_freed_memory() -> None:
    """Let glibc keep freed tensor buffers for reuse instead of unmapping them.

    Every streamed tensor needs fresh work buffers of similar sizes; with glibc's defaults each
    one above 32 MB is a new mmap whose first touch page-faults every page, which dominated the
    conversion time.  Resident memory stays bounded by the largest few tensors.  No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def leave_a_core_for_writes() -> None:
    """Use one torch thread fewer than there are cores (unless OMP_NUM_THREADS says otherwise).

    The writing thread needs a core while torch computes the next tensor; on a 2-core machine
    shared with other jobs, two spinning OpenMP threads cost 2.8x the CPU time of one (bench/RESULTS.md).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1)))


def _stored_bytes(ref: Any) -> int:
    return math.prod(ref.shape) * ITEMSIZE[ref.dtype]


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .safetensors file.")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="LightX2V config JSON (its lora_configs are merged first).")
@click.option("--lora", "lora_args", multiple=True, metavar="PATH[:STRENGTH][@EXPERT]", help="LoRA to merge (repeatable, applied in order).")
@click.option("--quantize", metavar="fp8|int8|bf16", help="Block-linear format: fp8 / int8 with fresh scales, or bf16 (dequantize).")
@click.option("--comfyui", is_flag=True, help="ComfyUI scaled-fp8 layout: per-tensor scale_weight and the scaled_fp8 marker.")
@click.option("--expert", metavar="high_noise|low_noise", help="Which Wan2.2 MoE expert to convert.")
@click.option("--lora-strict", is_flag=True, help="Fail on any LoRA key that matches nothing in the base.")
@click.option("--hash-sources", is_flag=True, help="Record the sha256 of every source file in the metadata (an extra read of each file not hashed before).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def convert_command(
    src: Path,
    output: Path,
    config: Path | None,
    lora_args: tuple[str, ...],
    quantize: str | None,
    comfyui: bool,
    expert: str | None,
    lora_strict: bool,
    hash_sources: bool,
    as_json: bool,
) -> None:
    """Merge LoRAs into one DiT expert of SRC and write it as a single LightX2V-layout safetensors file."""
    keep_freed_memory()
    leave_a_core_for_writes()
    loras = [parse_lora_arg(a) for a in lora_args]
    result = convert_checkpoint(
        src, output, config, loras, quantize, comfyui, expert, lora_strict, hash_sources, progress=not as_json
    )
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    q = result.quantization_error or result.requantization_error
    err = f"; quantization rel. RMS error {q['overall_rel_rms']:.2e} (worst {q['worst_rel_rms']:.2e})" if q else ""
    click.echo(
        f"{result.output}: {result.tensors} tensors, {result.bytes_written / 1e6:.1f} MB"
        f" ({result.expert}, {result.quantize or 'source precision'}, {len(result.loras)} LoRA(s)) in {result.seconds:.1f} s{err}"
    )
    if result.dropped_keys:
        click.echo(f"warning: {len(result.dropped_keys)} keys unknown to a Wan DiT were not copied, e.g. {result.dropped_keys[:3]}", err=True)
