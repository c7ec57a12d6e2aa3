"""`cli.py convert`: merge LoRAs and (re)quantize one DiT expert into a single LightX2V-layout safetensors file.

Output layout (`export.checkpoint.storage.LAYOUTS`: LightX2V `tools/convert`, lightx2v-formats.md §1):
- bare official key names; every tensor bf16 except the quantized block linears;
- `--quantize fp8`: block linears (self_attn, cross_attn, ffn) as float8_e4m3fn with a float32
  per-output-channel `<layer>.weight_scale` [out, 1] = amax/448; `--quantize int8`: int8, amax/127;
- `--comfyui`: ComfyUI's per-tensor float32 `<layer>.scale_weight` (a scalar) plus the `scaled_fp8`
  marker (ComfyUI ignores LightX2V's `weight_scale`: plain `--quantize fp8` files are for LightX2V).
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

from wanrt.calibration.formats import FORMAT_OF_DTYPE, FORMATS
from wanrt.calibration.quant import ERROR_ROW_STRIDE, QuantErrorSummary, quantize_measured
from wanrt.engines.errors import WanrtError
from wanrt.engines.digests import cached_sha256
from wanrt.export.checkpoint.safetensors_file import ITEMSIZE, torch_dtype
from wanrt.export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec
from wanrt.export.checkpoint.resolve import CONVERT_METADATA_KEY, Expert, ResolvedModel, resolve_model
from wanrt.export.checkpoint.storage import LAYOUTS, Layout, StoredTensor, TensorStorage, quantizable
from wanrt.export.lora import LoraSpec, apply_loras, lora_records, loras_from_config, normalize_expert, parse_lora_arg
from wanrt.export.lora.merge import MergedRef, MergedView

QUANTIZE_CHOICES = (*FORMATS, "bf16")
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


def output_layout(comfyui: bool) -> Layout:
    """The layout `convert` writes: LightX2V's, or ComfyUI's scaled fp8 with `--comfyui`."""
    return LAYOUTS["comfyui" if comfyui else "lightx2v"]


def plan_output(view: Mapping[str, Any], quantize: str | None, layout: Layout) -> list[TensorStorage]:
    """How each tensor is written: block linears as fp8/int8 codes + scale (fresh, or the source's format
    when `quantize` is None), everything else as the layout's float dtype."""
    plan = []
    for key in sorted(view):
        ref = view[key]
        fmt = None
        if quantizable(key, tuple(ref.shape)):
            # fp8_e4m3 / int8 sources keep their format (resolve_model refuses other quantized dtypes)
            fmt = FORMAT_OF_DTYPE.get(ref.dtype) if quantize is None else quantize if quantize in FORMATS else None
        plan.append(layout.store(key, tuple(ref.shape), fmt))
    return plan


def _specs(plan: list[TensorStorage], layout: Layout) -> list[TensorSpec]:
    entries: list[StoredTensor] = [e for o in plan for e in o.entries] + layout.markers
    return [TensorSpec(e.key, torch_dtype(e.dtype), e.shape) for e in entries]


def _real(ref: Any, dtype: torch.dtype) -> torch.Tensor:
    """The real-valued tensor in `dtype`; a LoRA-patched fp8/int8 weight skips requantization to its stored format."""
    if isinstance(ref, MergedRef) and ref.quantized:
        return ref.merged_fp32().to(dtype)
    return ref.load(dtype)


def _quantized_tensor(ref: Any, o: TensorStorage, granularity: str, errors: QuantErrorSummary) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of one block linear in the planned format, scale dtype and shape."""
    same_layout = FORMAT_OF_DTYPE.get(ref.dtype) == o.fmt and getattr(ref, "scale_layout", None) == granularity
    if same_layout:
        # unpatched: copy codes and scales as they are (lossless); patched: MergedRef requantizes
        q, scale = ref.load_stored()
    else:
        q, scale, err = quantize_measured(_real(ref, torch.float32), o.fmt, o.axis, overwrite=True, row_stride=ERROR_ROW_STRIDE)
        errors.add(o.tensor.key, err)
    return q, scale.to(torch_dtype(o.scale.dtype)).reshape(o.scale.shape)


def _stream(
    writer: SafetensorsWriter, view: Mapping[str, Any], plan: list[TensorStorage], layout: Layout, errors: QuantErrorSummary, bar: tqdm
) -> None:
    """Write every planned tensor; a worker computes the next one while this thread writes the last.

    Torch ops and `pwrite` both release the GIL, so reading/merging/quantizing overlaps writing;
    at most two output tensors are held at once.
    """

    def produce(o: TensorStorage) -> list[tuple[str, torch.Tensor]]:
        ref = view[o.tensor.key]
        if o.fmt is None:
            return [(o.tensor.key, _real(ref, torch_dtype(o.tensor.dtype)))]
        q, scale = _quantized_tensor(ref, o, layout.scale.granularity, errors)
        return [(o.tensor.key, q), (o.scale.key, scale)]

    def write(item: tuple[TensorStorage, Future]) -> None:
        o, future = item
        for key, tensor in future.result():
            writer.write(key, tensor)
        bar.update(_stored_bytes(view[o.tensor.key]))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanrt-convert") as pool:
        pending: deque[tuple[TensorStorage, Future]] = deque()
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
    if model.dit.vace:  # a single file has no config.json: keep where the VACE blocks feed in
        info["vace_layers"] = list(model.dit.vace_layers)
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
    layout = output_layout(comfyui)
    if comfyui and quantize not in layout.formats:
        raise WanrtError(f"--comfyui writes ComfyUI's scaled-fp8 layout; it needs --quantize {'/'.join(layout.formats)}")
    model = resolve_model(src, config)
    chosen = select_expert(model.experts, expert, src)
    all_loras = (loras_from_config(model.config, model.config_path) if model.config else []) + list(loras or [])
    view: Mapping[str, Any] = apply_loras(chosen.view, all_loras, chosen.name, strict) if all_loras else chosen.view
    used = [s for s in all_loras if s.expert in (None, chosen.name)]
    plan = plan_output(view, quantize, layout)
    metadata = _metadata(src, model, chosen, used, quantize, layout.scale.granularity, hash_sources)
    errors = QuantErrorSummary()
    total_in = sum(_stored_bytes(view[o.tensor.key]) for o in plan)

    desc = f"convert {chosen.name}"
    with tqdm(total=total_in, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=not progress) as bar:
        with SafetensorsWriter(output, _specs(plan, layout), metadata) as writer:
            _stream(writer, view, plan, layout, errors, bar)
            for marker in layout.markers:
                writer.write(marker.key, torch.zeros(marker.shape, dtype=torch_dtype(marker.dtype)))
    report = view.report if isinstance(view, MergedView) else None
    return ConvertResult(
        output=output,
        source=str(src),
        expert=chosen.name,
        quantize=quantize,
        layout=layout.scale.granularity if any(o.fmt for o in plan) else "none",
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
