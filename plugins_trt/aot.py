"""Compile our attention kernel ahead of time, without a GPU, into a plugin folder.

    DIR/plugin.json                      this folder's description (see `build_plugin`)
    DIR/kernels/LABEL.sm_NN.ptx          what TensorRT embeds in the plan (QDP AOT takes PTX)
    DIR/kernels/LABEL.sm_NN.cubin        the same kernel through ptxas: proof it assembles for the
                                         architecture, and its registers / spills / shared memory

`triton.compile(ASTSource(...), target=GPUTarget("cuda", CC, 32))` needs no GPU: Triton ships
ptxas.  The PTX declares the oldest ISA the architecture accepts (`tiles.ARCHS`), so any driver
that runs that GPU loads it.  Each (architecture, precision, I/O dtype, head size) gets the tile
candidates of `tiles.candidates` that fit the architecture's shared memory and do not spill; they
become TensorRT tactics 1..n in that order.  Every kernel is checked for the launch TensorRT can
give it: no Triton scratch memory, one CTA per program, no cooperative or PDL launch, no tensor
descriptors.  Most tiles need more than the 48 KB of shared memory a launch gets without opting in;
TensorRT is given each kernel's size (`KernelLaunchParams.shared_mem`), but whether its AOT launcher
opts in could not be checked without TensorRT, so every 16-bit candidate list ends with a tile of at
most 48 KB and `tensorrt_plugin.register_plugin(max_shared_bytes=49152)` offers only those.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import atomic_output
from wanrt.engines.plans import PluginRecord
from wanrt.engines.schema import load_json

from .kernels import (
    HEAD_DIMS, IO_DTYPES, KERNEL_NAME, MEAN_ROWS, MIN_ARCH, OUTPUT_ARGS, POINTER_ARGS, PRECISIONS, SCALAR_ARGS,
    KernelSpec, TileConfig, flash_kernel,
)  # fmt: skip
from .onnx_op import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from .tiles import ARCHS, DEFAULT_ARCHS, arch_tiles, candidates, supports

PLUGIN_JSON = "plugin.json"
FORMAT = "wanrt-attention-plugin"
SCHEMA_VERSION = 1
KERNELS_DIR = "kernels"


class PluginBuildError(WanrtError):
    """A plugin folder cannot be built or read as asked."""


def parse_arch(text: str) -> int:
    """"sm_90", "sm_90a", "90" or "9.0" -> 90."""
    match = re.fullmatch(r"(?:sm_?)?(\d+)\.?(\d)?a?", text.strip().lower())
    if not match:
        raise PluginBuildError(f"GPU architecture {text!r}: expected sm_XY (e.g. sm_80, sm_90)")
    arch = int(match.group(1) + (match.group(2) or ""))
    arch_tiles(arch)
    return arch


def parse_archs(text: str) -> tuple[int, ...]:
    """A comma-separated list of architectures, in order, without repeats."""
    archs = [parse_arch(part) for part in text.split(",") if part.strip()]
    if not archs:
        raise PluginBuildError(f"--gpu-arch {text!r}: no architecture given")
    return tuple(dict.fromkeys(archs))


def arch_name(arch: int) -> str:
    return f"sm_{arch}"


def detect_gpu_arch() -> int | None:
    """The compute capability (x 10) of GPU 0, or None without a GPU or a way to ask (cuda-python, torch)."""
    try:
        from cuda.bindings import driver

        if int(driver.cuInit(0)[0]) == 0:
            err, count = driver.cuDeviceGetCount()
            if int(err) == 0 and count > 0:
                _, major = driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0)
                _, minor = driver.cuDeviceGetAttribute(driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0)
                return int(major) * 10 + int(minor)
    except Exception:  # not installed, or no driver: cuInit raises (DynamicLibNotFoundError) rather than returning
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return major * 10 + minor
    except Exception:  # noqa: BLE001  (no torch, or a broken CUDA install: there is no GPU to ask)
        pass
    return None


def default_archs() -> tuple[int, ...]:
    """The build GPU's architecture, or `tiles.DEFAULT_ARCHS` when there is none."""
    arch = detect_gpu_arch()
    return (arch,) if arch is not None and arch in ARCHS else DEFAULT_ARCHS


def _triton():
    """Triton, for compiling (not its interpreter, which cannot produce PTX)."""
    try:
        import triton
    except ImportError as e:
        raise PluginBuildError("plugin-build needs Triton: pip install \"wanrt[trt]\" (or pip install triton)") from e
    from triton import knobs

    if knobs.runtime.interpret:
        raise PluginBuildError("plugin-build cannot compile kernels with TRITON_INTERPRET=1 set; unset it")
    return triton


def ptxas_version(arch: int) -> str:
    """The release of the ptxas Triton uses for `arch` (e.g. "12.9")."""
    from triton.backends.nvidia.compiler import get_ptxas

    return str(get_ptxas(arch).version)


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one architecture."""

    arch: int
    spec: KernelSpec
    kernel_name: str
    ptx: str
    cubin: bytes
    shared_bytes: int
    num_warps: int
    ptx_isa: str  # from the PTX's .version line


def launch_problems(metadata: Any) -> list[str]:
    """What in Triton's metadata a plain TensorRT AOT launch could not provide (empty: none)."""
    problems = []
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, field, 0):
            problems.append(f"{field}={getattr(metadata, field)} (TensorRT passes no scratch buffer)")
    if getattr(metadata, "num_ctas", 1) != 1:
        problems.append(f"num_ctas={metadata.num_ctas}")
    for flag in ("launch_cooperative_grid", "launch_pdl"):
        if getattr(metadata, flag, False):
            problems.append(flag)
    if getattr(metadata, "tensordesc_meta", None):
        problems.append("tensor descriptors")
    return problems


def compile_kernel(spec: KernelSpec, arch: int) -> CompiledKernel:
    """`spec` through Triton for `arch` (PTX at the architecture's oldest ISA, and its cubin)."""
    triton = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = arch_tiles(arch)
    if not supports(arch, spec.precision):
        raise PluginBuildError(f"attention precision {spec.precision!r} needs sm_{MIN_ARCH[spec.precision]} or newer, not {arch_name(arch)}")
    source = ASTSource(fn=flash_kernel(), signature=spec.signature(), constexprs=spec.constexprs(interpreted=False),
                       attrs=spec.pointer_alignment())
    options = {"num_warps": spec.tile.num_warps, "num_stages": spec.tile.num_stages, "ptx_version": row.ptx_isa,
               "enable_fp_fusion": True}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    metadata = compiled.metadata
    problems = launch_problems(metadata)
    if problems:
        raise PluginBuildError(f"kernel {spec.label} for {arch_name(arch)} needs what TensorRT's launch cannot give: {', '.join(problems)}")
    ptx = compiled.asm["ptx"]
    isa = re.search(r"^\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    return CompiledKernel(arch, spec, metadata.name, ptx, compiled.asm["cubin"], int(metadata.shared),
                          int(metadata.num_warps), isa.group(1) if isa else "")


def resource_usage(cubin_path: Path) -> dict[str, int]:
    """ptxas's resource report of a cubin (REG, STACK, SHARED, LOCAL), read with Triton's cuobjdump; {} without it."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump
    if tool is None:
        return {}
    result = subprocess.run([tool.path, "-res-usage", str(cubin_path)], capture_output=True, text=True, check=False)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", result.stdout)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


KERNEL_SOURCES = ("aot.py", "flash_kernel.py", "kernels.py", "tiles.py")  # what decides the compiled kernels


def kernel_source_digest() -> str:
    """sha256 over the kernel-making sources of this package and the installed Triton's version (a compiled plugin's identity)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = "none"
    h = hashlib.sha256(f"triton {triton_version}".encode())
    for name in KERNEL_SOURCES:
        h.update(b"\0" + name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def _variant_fields(spec: KernelSpec, arch: int) -> dict[str, Any]:
    return {"arch": arch_name(arch), "precision": spec.precision, "dtype": spec.dtype, "head_dim": spec.head_dim,
            "tile": spec.tile.to_dict()}


def _write_kernel(folder: Path, kernel: CompiledKernel) -> dict[str, Any]:
    """Write a kernel's PTX and cubin under `folder` and return its plugin.json record (tactic added later)."""
    stem = f"{KERNELS_DIR}/{kernel.spec.label}.{arch_name(kernel.arch)}"
    ptx_bytes = kernel.ptx.encode()
    (folder / f"{stem}.ptx").write_bytes(ptx_bytes)
    (folder / f"{stem}.cubin").write_bytes(kernel.cubin)
    usage = resource_usage(folder / f"{stem}.cubin")
    return {
        **_variant_fields(kernel.spec, kernel.arch),
        "kernel_name": kernel.kernel_name,
        "ptx": f"{stem}.ptx",
        "cubin": f"{stem}.cubin",
        "ptx_isa": kernel.ptx_isa,
        "shared_bytes": kernel.shared_bytes,
        "num_warps": kernel.num_warps,
        "registers": usage.get("REG"),
        "stack_bytes": usage.get("STACK"),
        "local_bytes": usage.get("LOCAL"),
        "sha256": {"ptx": _sha256(ptx_bytes), "cubin": _sha256(kernel.cubin)},
    }


def _rejection(record: dict[str, Any], max_shared: int) -> str | None:
    """Why a compiled candidate is not offered as a tactic (None: it is)."""
    if record["shared_bytes"] > max_shared:
        return f"needs {record['shared_bytes']} bytes of shared memory, {record['arch']} allows {max_shared}"
    spilled = (record["stack_bytes"] or 0) + (record["local_bytes"] or 0)
    if spilled:
        return f"spills: {record['stack_bytes']} bytes of stack, {record['local_bytes']} of local memory"
    return None


def plan_variants(archs: Iterable[int], precisions: Iterable[str], dtypes: Iterable[str],
                  head_dims: Iterable[int]) -> tuple[list[tuple[int, str, str, int]], list[dict[str, str]]]:
    """The (arch, precision, dtype, head_dim) variants to build, and the skipped ones with the reason."""
    variants, skipped = [], []
    for arch in archs:
        for precision in precisions:
            if not supports(arch, precision):
                skipped.append({"arch": arch_name(arch), "precision": precision,
                                "reason": f"{precision} needs sm_{MIN_ARCH[precision]} or newer"})
                continue
            for dtype in dtypes:
                if dtype not in IO_DTYPES[precision]:
                    skipped.append({"arch": arch_name(arch), "precision": precision, "dtype": dtype,
                                    "reason": f"{precision} takes {'/'.join(IO_DTYPES[precision])} inputs"})
                    continue
                variants.extend((arch, precision, dtype, head_dim) for head_dim in head_dims)
    return variants, skipped


def build_plugin(output: str | Path, archs: Iterable[int] | None = None, precisions: Iterable[str] = ("bf16",),
                 dtypes: Iterable[str] = ("bf16",), head_dims: Iterable[int] = (128,),
                 log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Compile the kernels into the plugin folder `output` (replaced whole, atomically); returns plugin.json's content."""
    archs = tuple(archs) if archs is not None else default_archs()
    precisions, dtypes, head_dims = tuple(precisions), tuple(dtypes), tuple(head_dims)
    for name, values, allowed in (("precision", precisions, PRECISIONS), ("head size", head_dims, HEAD_DIMS),
                                  ("I/O dtype", dtypes, ("bf16", "fp16", "fp32"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise PluginBuildError(f"attention {name} {bad or values}: expected some of {allowed}")
    for arch in archs:
        arch_tiles(arch)
    variants, skipped = plan_variants(archs, precisions, dtypes, head_dims)
    if not variants:
        raise PluginBuildError(f"nothing to build: {'; '.join(s['arch'] + ' ' + s['reason'] for s in skipped)}")
    triton = _triton()
    jobs = [(variant, tile) for variant in variants for tile in candidates(variant[0], variant[1], variant[3])]
    output = Path(output)
    kernels: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    with atomic_output(output, directory=True) as folder:
        (folder / KERNELS_DIR).mkdir()
        for index, ((arch, precision, dtype, head_dim), tile) in enumerate(jobs, 1):
            spec = KernelSpec(precision, dtype, head_dim, tile)
            log(f"[{index}/{len(jobs)}] {arch_name(arch)} {spec.label}")
            try:
                kernel = compile_kernel(spec, arch)
            except PluginBuildError:
                raise
            except Exception as e:  # a Triton / ptxas failure for this tile: recorded, the others go on
                first_line = (str(e).strip().splitlines() or [""])[0][:200]
                rejected.append({**_variant_fields(spec, arch), "reason": f"compile failed: {type(e).__name__}: {first_line}"})
                log(f"    rejected: {rejected[-1]['reason']}")
                continue
            record = _write_kernel(folder, kernel)
            reason = _rejection(record, arch_tiles(arch).max_shared_bytes)
            if reason:
                rejected.append({**record, "reason": reason})
                log(f"    rejected: {reason}")
            else:
                kernels.append(record)
        _number_tactics(kernels, rejected, folder)
        description = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "plugin": {"name": OP_TYPE, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE},
            "kernel_abi": {
                "entry": KERNEL_NAME,
                "params": [*POINTER_ARGS, *SCALAR_ARGS, *OUTPUT_ARGS],
                "scalars": "int32: float32 bits of scale*log2(e), Sq, Sk",
                "layout": "q/k/v/out contiguous [B, heads, S, head_dim]",
                "grid": ["cdiv(Sq, block_m)", "B*heads", 1],
                "block": ["num_warps*32", 1, 1],
            },
            "mean_rows": MEAN_ROWS,
            "triton": triton.__version__,
            "ptxas": {arch_name(arch): ptxas_version(arch) for arch in archs},
            "kernels": kernels,
            "rejected": rejected,
            "skipped": skipped,
        }
        (folder / PLUGIN_JSON).write_text(json.dumps(description, indent=1) + "\n")
    return description


def _number_tactics(kernels: list[dict[str, Any]], rejected: list[dict[str, Any]], folder: Path) -> None:
    """Tactics 1..n per variant in candidate order; a variant with none left keeps its least-spilling tile."""
    def variant(r: dict[str, Any]) -> tuple:
        return (r["arch"], r["precision"], r["dtype"], r["head_dim"])

    kept = {variant(r) for r in kernels}
    for key in dict.fromkeys(variant(r) for r in rejected):
        if key in kept:
            continue
        fitting = [r for r in rejected if variant(r) == key and "ptx" in r and "shared memory" not in r["reason"]]
        if not fitting:
            raise PluginBuildError(f"no tile of {key} compiled and fits its architecture's shared memory: "
                                   + "; ".join(r["reason"] for r in rejected if variant(r) == key))
        best = min(fitting, key=lambda r: (r["stack_bytes"] or 0) + (r["local_bytes"] or 0))
        rejected.remove(best)
        kernels.append({**{k: v for k, v in best.items() if k != "reason"}, "note": best["reason"]})
    counters: dict[tuple, int] = {}
    order = {key: i for i, key in enumerate(dict.fromkeys(variant(r) for r in kernels))}
    kernels.sort(key=lambda r: order[variant(r)])
    for record in kernels:
        counters[variant(record)] = counters.get(variant(record), 0) + 1
        record["tactic"] = counters[variant(record)]
    for record in rejected:  # rejected kernels are described, not shipped
        for key in ("ptx", "cubin"):
            if key in record:
                (folder / record.pop(key)).unlink()
        record.pop("sha256", None)


def read_plugin(folder: str | Path) -> dict[str, Any]:
    """plugin.json of a plugin folder, checked: format, schema, every kernel file present and unchanged."""
    folder = Path(folder)
    path = folder / PLUGIN_JSON
    try:
        description = load_json(path.read_bytes(), str(path), PluginBuildError)
    except FileNotFoundError as e:
        raise PluginBuildError(f"{path}: no plugin description here (run plugin-build)") from e
    except OSError as e:
        raise PluginBuildError(f"{path}: not readable ({e.strerror})") from e
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise PluginBuildError(f"{path}: not a wanrt attention plugin description (format {description.get('format') if isinstance(description, dict) else None!r}, expected {FORMAT!r})")
    if description.get("schema_version") != SCHEMA_VERSION:
        raise PluginBuildError(f"{path}: schema_version {description.get('schema_version')!r}, this wanrt reads {SCHEMA_VERSION}")
    for record in description.get("kernels", []):
        for key in ("ptx", "cubin"):
            file = folder / record[key]
            if not file.is_file():
                raise PluginBuildError(f"{path}: kernel file {record[key]} is missing")
            if _sha256(file.read_bytes()) != record["sha256"][key]:
                raise PluginBuildError(f"{path}: kernel file {record[key]} does not match its sha256")
    return description


def kernel_table(description: dict[str, Any], arch: int, precision: str) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The kernels for one architecture and precision: (dtype, head_dim) -> records in tactic order."""
    table: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in description.get("kernels", []):
        if record["arch"] == arch_name(arch) and record["precision"] == precision:
            table.setdefault((record["dtype"], record["head_dim"]), []).append(record)
    if not table:
        built = sorted({(r["arch"], r["precision"]) for r in description.get("kernels", [])})
        raise PluginBuildError(f"the plugin folder has no {precision} kernels for {arch_name(arch)} (it has {built}); run plugin-build for it")
    for records in table.values():
        records.sort(key=lambda r: r["tactic"])
    return table


def tile_of(record: dict[str, Any]) -> TileConfig:
    return TileConfig(**record["tile"])


def plugin_record(description: dict[str, Any], precision: str, archs: Iterable[int] | None = None) -> PluginRecord:
    """The manifest's record of the plugin a TensorRT plan embeds (`engines.plans.PluginRecord`)."""
    wanted = {arch_name(a) for a in archs} if archs is not None else None
    records = [r for r in description["kernels"] if r["precision"] == precision and (wanted is None or r["arch"] in wanted)]
    if not records:
        raise PluginBuildError(f"the plugin description has no {precision} kernels for {sorted(wanted) if wanted else 'any architecture'}")
    plugin = description["plugin"]
    return PluginRecord(name=plugin["name"], namespace=plugin["namespace"], version=plugin["version"], precision=precision,
                        kernel_archs=sorted({r["arch"] for r in records}, key=lambda a: int(a[3:])))
