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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def write_rank64_lora(base_file: Path, out: Path, rank: int = 64) -> None:
    """A LightX2V-style distill LoRA on every block linear (bf16 up/down) plus diff_b / diff_m deltas."""
    import torch

    from wanrt.export.checkpoint.safetensors_writer import SafetensorsWriter, TensorSpec
    from wanrt.export.checkpoint.view import CheckpointView, open_source

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


@dataclass
class Run:
    """One contender: its command, optional environment overrides, and the best of its repeats."""

    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    wall: float = float("inf")
    cpu: float = 0.0
    rss: int = 0

    def once(self) -> None:
        """Run once; keep the fastest wall time (with its CPU time) and the largest peak RSS."""
        t0 = time.perf_counter()
        p = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **self.env})
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(self.cmd)} failed")
        if wall < self.wall:
            self.wall, self.cpu = wall, usage.ru_utime + usage.ru_stime
        self.rss = max(self.rss, usage.ru_maxrss * 1024)  # Linux reports KiB


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

    from wanrt.export.tiny import make_tiny_model

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
    convert = [sys.executable, str(ROOT / "cli.py"), "convert", str(src), "-o", str(out), "--quantize", "fp8", "--json"]
    cores = os.cpu_count() or 1
    threads = max(1, cores - 1)
    runs = [
        Run("`cp` (baseline, same bytes)", ["cp", *map(str, sources), str(cp_out) + "/"]),
        Run(f"`convert --lora --quantize fp8` (default: {threads} torch thread(s), one core left for writes)", convert + ["--lora", str(lora)]),
        Run(f"`convert --lora --quantize fp8`, OMP_NUM_THREADS={cores} (every core)", convert + ["--lora", str(lora)], {"OMP_NUM_THREADS": str(cores)}),
        Run("`convert --quantize fp8` (no LoRA, default threads)", convert),
    ]
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for run in runs:
            shutil.rmtree(cp_out, ignore_errors=True)
            cp_out.mkdir(parents=True)
            out.unlink(missing_ok=True)
            run.once()
            load = max(load, os.getloadavg()[0])
    shutil.rmtree(cp_out, ignore_errors=True)
    imports = Run("imports", [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import cli, torch, wanrt.export.convert"])
    imports.once()

    cp, main_run = runs[0], runs[1]
    ratio = cp.wall / main_run.wall
    cpu_ratio = cp.cpu / main_run.cpu
    rows = [
        f"### convert (helper B) — {datetime.date.today().isoformat()}",
        "",
        f"Command: `.venv/bin/python bench/convert.py --layers {args.layers} --layout {args.layout} --repeats {args.repeats}`"
        " (runs `cli.py convert SRC -o OUT.safetensors --lora lora_rank64.safetensors --quantize fp8 --json` as a child process)",
        "",
        f"Machine: {machine()}",
        "",
        f"Source: Wan2.1 1.3B dims (dim 1536, ffn 8960, {args.layers} blocks), {args.layout}, {src_bytes / 1e9:.2f} GB;"
        f" LoRA rank 64 on all 10 block linears + diff_b/diff_m, {lora.stat().st_size / 1e6:.0f} MB; page cache warm;"
        f" best wall time of {args.repeats} runs each, interleaved.",
        "",
        "| what | wall s | CPU s (user+sys) | throughput (source bytes / wall) | peak RSS |",
        "|---|---|---|---|---|",
        *(f"| {r.label} | {r.wall:.2f} | {r.cpu:.2f} | {src_bytes / r.wall / 1e9:.3f} GB/s | "
          f"{'-' if r is cp else f'{r.rss / 1e9:.2f} GB'} |" for r in runs),
        f"| python + torch + wanrt imports alone | {imports.wall:.2f} | {imports.cpu:.2f} | - | - |",
        "",
        f"Load average during the run: up to {load:.1f} on {os.cpu_count()} cores (machine shared with other jobs).",
        "",
        f"Throughput ratio convert/cp: {ratio:.3f} by wall time, {cpu_ratio:.3f} by CPU time (goal >= 0.5:"
        f" {'met' if ratio >= 0.5 else 'NOT met'}); peak RSS {max(r.rss for r in runs[1:]) / 1e9:.2f} GB"
        f" (goal < 2 GB: {'met' if max(r.rss for r in runs[1:]) < 2e9 else 'NOT met'}).",
        "Convert times include interpreter + torch import, fsync of the output and the quantization-error report.",
    ]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
