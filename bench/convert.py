"""Benchmark `cli.py convert` on a 1.3B-dimension checkpoint with a rank-64 LoRA and `--quantize fp8`.

Baseline in the same run: `cp` of the same source bytes.  Goals (issue 3): convert throughput at
least half of cp's, peak RSS of the convert process under 2 GB.  Prints a markdown block for
bench/RESULTS.md.

    .venv/bin/python bench/convert.py [--workdir /tmp/wanrt-bench-convert] [--layers 30] [--layout lightx2v-bf16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def write_rank64_lora(base_file: Path, out: Path, rank: int = 64) -> None:
    """A LightX2V-style distill LoRA on every block linear (bf16 up/down) plus diff_b / diff_m deltas."""
    import torch

    from export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec
    from export.checkpoint.view import CheckpointView, open_source

    view = CheckpointView([open_source(base_file)])
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    layers = sorted({int(k.split(".")[1]) for k in view if k.startswith("blocks.")})
    for n in layers:
        for m in LINEARS:
            o, i = view[f"blocks.{n}.{m}.weight"].shape
            tensors[f"diffusion_model.blocks.{n}.{m}.lora_up.weight"] = ((o, rank), "up")
            tensors[f"diffusion_model.blocks.{n}.{m}.lora_down.weight"] = ((rank, i), "down")
            tensors[f"diffusion_model.blocks.{n}.{m}.diff_b"] = ((o,), "diff")
        tensors[f"diffusion_model.blocks.{n}.diff_m"] = (tuple(view[f"blocks.{n}.modulation"].shape), "diff")
    g = torch.Generator().manual_seed(0)
    specs = [TensorSpec(k, torch.bfloat16, shape) for k, (shape, _) in tensors.items()]
    with SafetensorsWriter(out, specs, fsync=False) as w:
        for k, (shape, _) in tensors.items():
            w.write(k, (torch.randn(shape, generator=g) * 0.01).to(torch.bfloat16))


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds user+sys, peak RSS bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # Linux reports KiB


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 1024**2
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wanrt-bench-convert"))
    ap.add_argument("--layers", type=int, default=30, help="DiT blocks (1.3B has 30)")
    ap.add_argument("--layout", default="lightx2v-bf16", help="make-tiny-model layout of the source")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for both convert and cp")
    args = ap.parse_args()

    from export.tiny import make_tiny_model

    work = args.workdir
    model = work / f"wan21-1.3B-{args.layers}L-{args.layout}"
    if not model.exists():
        make_tiny_model(model, "wan2.1", "t2v", layout=args.layout, dims=f"1.3B:{args.layers}")
    sources = sorted(p for p in model.rglob("*.safetensors"))
    src = sources[0] if len(sources) == 1 else model
    lora = work / "lora_rank64.safetensors"
    if not lora.exists():
        write_rank64_lora(sources[0], lora)
    src_bytes = sum(p.stat().st_size for p in sources)
    out = work / "out_fp8.safetensors"
    cp_out = work / "cp_copy"

    # warm the page cache for both contenders
    for p in sources + [lora]:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    convert_cmd = [sys.executable, str(ROOT / "cli.py"), "convert", str(src), "-o", str(out), "--lora", str(lora), "--quantize", "fp8", "--json"]
    cp_cmd = ["cp", *map(str, sources), str(cp_out) + "/"]
    best_cv = best_cp = (float("inf"), 0.0)
    peak = 0
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        shutil.rmtree(cp_out, ignore_errors=True)
        cp_out.mkdir(parents=True)
        t_cp, cpu_cp, _ = timed(cp_cmd)
        best_cp = min(best_cp, (t_cp, cpu_cp))
        out.unlink(missing_ok=True)
        t_cv, cpu_cv, rss = timed(convert_cmd)
        best_cv, peak = min(best_cv, (t_cv, cpu_cv)), max(peak, rss)
    shutil.rmtree(cp_out, ignore_errors=True)
    load = max(load, os.getloadavg()[0])
    (best_cp, cpu_cp), (best_cv, cpu_cv) = best_cp, best_cv
    _, cpu_import, _ = timed([sys.executable, "-c", "import torch, export.convert"])

    cp_tp, cv_tp = src_bytes / best_cp, src_bytes / best_cv
    ratio = cv_tp / cp_tp
    rows = [
        f"### convert (helper B) — {datetime.date.today().isoformat()}",
        "",
        f"Command: `.venv/bin/python bench/convert.py --layers {args.layers} --layout {args.layout}` "
        f"(runs `{' '.join(['cli.py', 'convert', 'SRC', '-o', 'OUT', '--lora', 'lora_rank64.safetensors', '--quantize', 'fp8', '--json'])}`)",
        "",
        f"Machine: {machine()}",
        "",
        f"Source: Wan2.1 1.3B dims (dim 1536, ffn 8960, {args.layers} blocks), {args.layout}, {src_bytes / 1e9:.2f} GB;"
        f" LoRA rank 64 on all 10 block linears + diff_b/diff_m, {lora.stat().st_size / 1e6:.0f} MB; page cache warm; best of {args.repeats}.",
        "",
        "| what | wall s | CPU s (user+sys) | throughput (source bytes / wall) | peak RSS |",
        "|---|---|---|---|---|",
        f"| `cp` (baseline, same bytes) | {best_cp:.2f} | {cpu_cp:.2f} | {cp_tp / 1e9:.2f} GB/s | - |",
        f"| `convert --lora --quantize fp8` | {best_cv:.2f} | {cpu_cv:.2f} | {cv_tp / 1e9:.2f} GB/s | {peak / 1e9:.2f} GB |",
        f"| (of which: python + torch + wanrt imports) | - | {cpu_import:.2f} | - | - |",
        "",
        f"Load average during the run: up to {load:.1f} on {os.cpu_count()} cores (machine shared with other jobs).",
        "",
        f"Throughput ratio convert/cp: {ratio:.2f} (goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'});"
        f" peak RSS {peak / 1e9:.2f} GB (goal < 2 GB: {'met' if peak < 2e9 else 'NOT met'}).",
        "Convert time includes interpreter + torch import, fsync of the output and the quantization-error report.",
    ]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
