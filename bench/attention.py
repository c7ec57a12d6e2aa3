"""Our attention kernels (bf16, fp8, int8 QK^T) against torch's scaled_dot_product_attention on a GPU.

One command prints the table for bench/RESULTS.md (B=1, 40 heads, head size 128, Wan's video
lengths and cross-attention):

    python bench/attention.py [--out DIR] [--iters 10] [--shapes all|480p|...] [--quick]

For each shape: torch SDPA with the flash backend in bf16 (the baseline; cuDNN's backend too
where torch has it, for reference), then each of our precisions with every tile candidate of
this GPU's architecture (`plugins_trt.tiles`: the autotuning a TensorRT build does through its
tactics), reporting the best and each tile.  Time: median of CUDA-event timings after warm-up.
TFLOP/s counts 4 * B * heads * Sq * Sk * head_dim.  Relative error = ||out - ref|| / ||ref|| on
3 heads x 2048 query rows (spread over the sequence) against a float32 reference (TF32 off) on
the same bf16 inputs (standard normal: near-uniform attention, the hardest case for fp8 QK^T).

It also checks, on this GPU, what TensorRT will run: `aot.compile_kernel` output (PTX at the
oldest ISA, as plugin-build writes it) loaded by the CUDA driver and launched with TensorRT's
argument list (3 pointers, 3 int32, 1 pointer, NULL for Triton's scratch pointers) and the
shared-memory opt-in, compared with the JIT launch; and the small odd shapes of the CPU tests,
every precision, against the numpy reference.

`--dry-run` (with TRITON_INTERPRET=1) runs the same code on the CPU on tiny shapes, to check the
script itself.  Writes `attention.md` (the RESULTS.md section) and `attention.json` into --out.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wanrt.plugins_trt import reference  # noqa: E402
from wanrt.plugins_trt.kernels import KernelSpec, qk_scale_bits, run_attention  # noqa: E402
from wanrt.plugins_trt.tiles import candidates, supports  # noqa: E402

# name: (B, heads, Sq, Sk, head_dim)
SHAPES = {
    "480p self": (1, 40, 32760, 32760, 128),  # 81 frames 480x832: 21 x 30 x 52 latent tokens
    "720p self": (1, 40, 75600, 75600, 128),  # 81 frames 720x1280: 21 x 45 x 80
    "480p cross text": (1, 40, 32760, 512, 128),  # umT5 context, 512 rows
    "480p cross CLIP": (1, 40, 32760, 257, 128),  # CLIP image context (i2v)
}
DRY_SHAPES = {"tiny self": (1, 2, 97, 97, 128), "tiny cross": (1, 2, 61, 40, 128)}
PRECISIONS = ("bf16", "fp8", "int8")
REF_HEADS, REF_ROWS = 3, 2048
GOALS = {"bf16": (1.0, 2e-2), "fp8": (1.3, 2e-2)}
# The CPU tests' shapes: (B, heads, Sq, Sk, head_dim)
SMALL = [(2, 3, 37, 53, 64), (2, 2, 19, 77, 128), (1, 3, 1, 65, 64), (1, 1, 9, 700, 64), (2, 1, 45, 70, 128)]


def flops(shape) -> float:
    batch, heads, seq_q, seq_k, head_dim = shape
    return 4.0 * batch * heads * seq_q * seq_k * head_dim


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, iters: int, min_seconds: float = 1.0):
        self.device, self.iters, self.min_seconds = device, iters, min_seconds

    def __call__(self, fn) -> float:
        fn()  # warm-up (compiles on first use)
        fn()
        self.sync()
        times, spent = [], 0.0
        while len(times) < self.iters or (spent < self.min_seconds and len(times) < 5 * self.iters):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            spent += times[-1]
        return statistics.median(times)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def reference_rows(seq_q: int) -> torch.Tensor:
    return torch.linspace(0, seq_q - 1, min(REF_ROWS, seq_q)).round().long().unique()


def reference_subset(q, k, v, scale, heads, rows):
    """float32 attention (TF32 off) for the given heads and query rows, over all keys, in chunks."""
    out = []
    for h in heads:
        kh, vh = k[:, h].float(), v[:, h].float()
        chunks = []
        for part in rows.split(512):
            s = torch.matmul(q[:, h, part.to(q.device)].float() * scale, kh.transpose(-1, -2))
            chunks.append(torch.matmul(torch.softmax(s, dim=-1), vh))
        out.append(torch.cat(chunks, dim=1))
    return torch.stack(out, dim=1)


def rel_err(out, ref, heads, rows) -> float:
    sub = out[:, heads][:, :, rows.to(out.device)].float()
    return float(torch.linalg.vector_norm(sub - ref) / torch.linalg.vector_norm(ref))


def sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, scale):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return run


def bench_shape(name, shape, arch, device, timer, precisions, quick, log):
    """Rows for one shape: the SDPA baselines, then each (precision, tile) of ours."""
    batch, heads, seq_q, seq_k, head_dim = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, s, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
               for s in (seq_q, seq_k, seq_k))
    scale = 1 / math.sqrt(head_dim)
    ref_heads = sorted({0, heads // 2, heads - 1})[:REF_HEADS]
    rows = reference_rows(seq_q)
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = reference_subset(q, k, v, scale, ref_heads, rows)
    torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    results = []

    def measure(impl, tile, fn):
        try:
            out = fn()
            seconds = timer(fn)
            err = rel_err(out, ref, ref_heads, rows)
        except Exception as e:  # a backend torch lacks here, a tile that does not launch: recorded, not fatal
            results.append({"shape": name, "impl": impl, "tile": tile, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            log(f"  {impl:14s} {tile or '':14s} failed: {results[-1]['error']}")
            return
        results.append({"shape": name, "impl": impl, "tile": tile, "seconds": seconds,
                        "tflops": flops(shape) / seconds / 1e12, "rel_err": err})
        log(f"  {impl:14s} {tile or '':14s} {seconds * 1e3:9.2f} ms {flops(shape) / seconds / 1e12:7.1f} TFLOP/s  err {err:.2e}")

    baselines = ("MATH",) if device == "cpu" else ("FLASH_ATTENTION", "CUDNN_ATTENTION")
    for backend in baselines:
        run = sdpa(backend)
        measure(f"sdpa {backend.split('_')[0].lower()}", None, lambda run=run: run(q, k, v, scale))
    for precision in precisions:
        if not supports(arch, precision):
            continue
        tiles = candidates(arch, precision, head_dim)
        for tile in tiles[:1] if quick else tiles:
            measure(f"ours {precision}", tile.label, lambda tile=tile: run_attention(q, k, v, scale, precision, tile))
    return results


def aot_launch_check(arch: int, log) -> dict:
    """The PTX plugin-build writes, loaded by the driver and launched with TensorRT's arguments, vs the JIT launch."""
    from cuda.bindings import driver as cu

    from wanrt.plugins_trt.aot import compile_kernel

    shape, scale = (1, 4, 1000, 1531, 128), 128 ** -0.5
    tile = candidates(arch, "bf16", 128)[0]
    kernel = compile_kernel(KernelSpec("bf16", "bf16", 128, tile), arch)
    batch, heads, seq_q, seq_k, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, heads, s, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for s in (seq_q, seq_k, seq_k))
    out = torch.empty_like(q)

    def check(result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError(f"CUDA driver error {int(err)}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    module = check(cu.cuModuleLoadData(kernel.ptx.encode() + b"\0"))  # the driver JIT-compiles the PTX, as TensorRT has it do
    function = check(cu.cuModuleGetFunction(module, kernel.kernel_name.encode()))
    if kernel.shared_bytes > 48 * 1024:
        check(cu.cuFuncSetAttribute(function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared_bytes))
    entry = kernel.ptx.split(f".entry {kernel.kernel_name}(")[1].split(")")[0]
    n_params = entry.count(".param")
    values = [q.data_ptr(), k.data_ptr(), v.data_ptr(), qk_scale_bits(scale), seq_q, seq_k, out.data_ptr()]
    types = [ctypes.c_void_p] * 3 + [ctypes.c_int32] * 3 + [ctypes.c_void_p]
    values += [0] * (n_params - len(values))  # Triton's scratch pointers: NULL, as TensorRT pads them
    types += [ctypes.c_void_p] * (n_params - len(types))
    grid = KernelSpec("bf16", "bf16", 128, tile).grid(seq_q, batch * heads)
    stream = torch.cuda.current_stream().cuda_stream
    check(cu.cuLaunchKernel(function, *grid, tile.num_warps * 32, 1, 1, kernel.shared_bytes, cu.CUstream(stream),
                            (tuple(values), tuple(types)), 0))
    torch.cuda.synchronize()
    jit = run_attention(q, k, v, scale, "bf16", tile)
    exact = reference.attention(*(t.float().cpu().numpy() for t in (q, k, v)), scale)
    result = {
        "tile": tile.label, "ptx_isa": kernel.ptx_isa, "shared_bytes": kernel.shared_bytes, "params": n_params,
        "max_abs_diff_vs_jit": float((out.float() - jit.float()).abs().max()),
        "rel_err_vs_reference": float(np.linalg.norm(out.float().cpu().numpy() - exact) / np.linalg.norm(exact)),
    }
    log(f"AOT launch check: {result}")
    check(cu.cuModuleUnload(module))
    return result


def small_shapes_check(device: str, arch: int, log) -> list[dict]:
    rows = []
    for shape in SMALL if device == "cuda" else SMALL[:1]:
        batch, heads, seq_q, seq_k, head_dim = shape
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(batch, heads, s, head_dim, generator=gen).to(torch.bfloat16) for s in (seq_q, seq_k, seq_k))
        exact = reference.attention(*(t.float().numpy() for t in (q, k, v)), head_dim ** -0.5)
        for precision in PRECISIONS:
            if not supports(arch, precision):
                continue
            for tile in candidates(arch, precision, head_dim)[:1 if device == "cpu" else None]:
                out = run_attention(*(t.to(device) for t in (q, k, v)), head_dim ** -0.5, precision, tile).float().cpu().numpy()
                err = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                rows.append({"shape": shape, "precision": precision, "tile": tile.label, "rel_err": err})
    worst = {}
    for r in rows:
        worst[r["precision"]] = max(worst.get(r["precision"], 0.0), r["rel_err"])
    log(f"small odd shapes, worst relative error per precision (all tiles): {worst}")
    return rows


def environment(device: str) -> dict:
    import triton

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "device": device}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        env["commit"] = "?"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count, cc=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    else:
        env["gpu"] = "none (CPU, Triton interpreter: a dry run of this script, not a measurement)"
    return env


def markdown(env: dict, results: list[dict], aot: dict | None, small: list[dict]) -> str:
    lines = [
        "<!-- attention:begin -->",
        "## Attention kernels (`bench/attention.py`)",
        "",
        "Command: `python bench/attention.py`  ",
        f"Machine: {env.get('gpu')} (cc {env.get('cc', '-')}, driver {env.get('driver', '-')}), torch {env['torch']}, "
        f"Triton {env['triton']}, Python {env['python']}  ",
        f"Date: {env['date']}, commit {env['commit']}",
        "",
        "B=1, head size 128, bf16 inputs (standard normal), softmax scale 1/sqrt(128).  Time: median of CUDA-event "
        "timings; TFLOP/s = 4*B*heads*Sq*Sk*d / time; x SDPA = SDPA flash time / this time; error = ||out - ref|| / "
        "||ref|| against float32 on 3 heads x 2048 query rows.  'ours' rows: the best tile of this GPU's candidates "
        "(all tiles below).",
        "",
        "| shape | implementation | best tile | ms | TFLOP/s | x SDPA flash | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == shape and "seconds" in r]
        base = next((r for r in rows if r["impl"] in ("sdpa flash", "sdpa math")), None)
        for impl in dict.fromkeys(r["impl"] for r in rows):
            best = min((r for r in rows if r["impl"] == impl), key=lambda r: r["seconds"])
            ratio = base["seconds"] / best["seconds"] if base else float("nan")
            lines.append(f"| {shape} | {impl} | {best['tile'] or '-'} | {best['seconds'] * 1e3:.2f} | {best['tflops']:.1f} | "
                         f"{ratio:.2f} | {best['rel_err']:.2e} |")
            precision = impl.split()[-1]
            if impl.startswith("ours") and precision in GOALS:
                goal_ratio, goal_err = GOALS[precision]
                met = "met" if ratio >= goal_ratio and best["rel_err"] <= goal_err else "NOT met"
                summary.append(f"- {shape}, {precision}: {ratio:.2f}x SDPA flash at error {best['rel_err']:.1e} "
                               f"(goal >= {goal_ratio}x at <= {goal_err:.0e}): {met}")
    failed = [r for r in results if "error" in r]
    lines += ["", "Goals:", *summary, "", "Every tile (ms / TFLOP/s / error):", ""]
    lines += ["| shape | implementation | tile | ms | TFLOP/s | rel. error |", "|---|---|---|---|---|---|"]
    for r in results:
        if "seconds" in r and r["tile"]:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['tile']} | {r['seconds'] * 1e3:.2f} | {r['tflops']:.1f} | {r['rel_err']:.2e} |")
    for r in failed:
        lines.append(f"| {r['shape']} | {r['impl']} | {r['tile'] or '-'} | failed: {r['error']} | | |")
    if aot:
        lines += ["", f"AOT launch (PTX ISA {aot['ptx_isa']} loaded by the driver, TensorRT's {aot['params']}-argument launch, "
                      f"{aot['shared_bytes']} B shared memory opted in, tile {aot['tile']}): max |AOT - JIT| = "
                      f"{aot['max_abs_diff_vs_jit']:.3g}, error vs reference {aot['rel_err_vs_reference']:.2e}."]
    if small:
        worst = {}
        for r in small:
            worst[r["precision"]] = max(worst.get(r["precision"], 0.0), r["rel_err"])
        lines += ["", "Small odd shapes of the CPU tests on this device, every tile, worst error: "
                  + ", ".join(f"{p} {e:.1e}" for p, e in worst.items()) + "."]
    lines.append("<!-- attention:end -->")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "_work" / "attention", help="folder for attention.md / .json")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per measurement (at least; up to 5x for 1 s)")
    ap.add_argument("--shapes", default="all", help=f"comma-separated names of {list(SHAPES)} (or all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--quick", action="store_true", help="time only each precision's first tile candidate")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: check the script itself")
    args = ap.parse_args()

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here (use --dry-run with TRITON_INTERPRET=1 to check the script on a CPU)")
    arch = 90 if device == "cpu" else (lambda c: c[0] * 10 + c[1])(torch.cuda.get_device_capability())
    shapes = DRY_SHAPES if args.dry_run else (SHAPES if args.shapes == "all" else {n: SHAPES[n] for n in args.shapes.split(",")})
    precisions = tuple(p for p in args.precisions.split(",") if p)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    env = environment(device)
    log(f"{env}")
    timer = Timer(device, 1 if args.dry_run else args.iters, 0.0 if args.dry_run else 1.0)
    results = []
    for name, shape in shapes.items():
        log(f"{name} {shape}")
        results += bench_shape(name, shape, arch, device, timer, precisions, args.quick or args.dry_run, log)
        if device == "cuda":
            torch.cuda.empty_cache()
    aot = None
    if device == "cuda":
        try:
            aot = aot_launch_check(arch, log)
        except Exception as e:  # reported in the table, the timings stand
            aot = None
            log(f"AOT launch check failed: {type(e).__name__}: {e}")
            results.append({"shape": "AOT launch check", "impl": "ours bf16", "tile": None, "error": f"{type(e).__name__}: {e}"})
    small = small_shapes_check(device, arch, log)
    text = markdown(env, results, aot, small)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.md").write_text(text)
    (args.out / "attention.json").write_text(json.dumps({"environment": env, "results": results, "aot": aot, "small": small}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
