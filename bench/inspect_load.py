#!/usr/bin/env python3
"""Benchmark: `inspect` on 14B-dimension folders, streaming load of a 1.3B-dimension folder.

1. inspect (goal: median within 0.35 s, headers only): `python cli.py inspect DIR --json` as a
   fresh process on Wan2.1 I2V-14B and Wan2.2 T2V-A14B folders with the real shapes, shard layout
   and companions (`make_tiny_model(..., dims="14B", sparse=True)`: real headers and file sizes,
   data left as file holes, since inspect never reads data).  Runs in the environment it is given
   (with PYTHONDONTWRITEBYTECODE=1 every start compiles wanrt's sources), and once more with
   bytecode cached, as an installed copy runs.  Baselines in the same run: the bare interpreter
   start (`python -c pass`, and `python -c "import click"`) and reading the same shard headers
   with the safetensors library (`safe_open(...).keys()`).
2. load: a Wan2.1 T2V-1.3B-dimension official folder (random fp32, 5.7 GB) streamed through
   `CheckpointView.iter_tensors` (fp32, and cast to bf16), and the LightX2V fp8 file of the same
   dims dequantized to bf16, each next to a plain sequential `readinto` of the same bytes.  Every
   run is a fresh process (peak RSS = its own VmHWM), page cache dropped before each cold run
   (`posix_fadvise(DONTNEED)`); warm runs read from the page cache.

    python bench/inspect_load.py [--work bench/_work] [--skip-load] [--write-results]

Each part has its own section in bench/RESULTS.md; `--skip-load` rewrites only the inspect one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

MARKS = {"inspect": ("<!-- inspect_load:begin -->", "<!-- inspect_load:end -->"),
         "load": ("<!-- inspect_load:stream:begin -->", "<!-- inspect_load:stream:end -->")}
GOAL_S = 0.35  # issue 10: median of `inspect --json` on a 14B-dimension folder
INSPECT_NOTES = [
    '- The 14B folders come from `make_tiny_model(..., dims="14B", sparse=True)`: real headers, shard layout, tensor count and file sizes, the data section left as a file hole (inspect reads headers only).',
    "- `inspect` imports no torch, numpy or ONNX (tests/export/checkpoint/test_command.py checks `sys.modules`); what is left above the interpreter start is click, wanrt's header-reading modules (compiled from source at every start when PYTHONDONTWRITEBYTECODE is set) and the header parsing itself.",
]
LOAD_NOTES = [
    '- Streaming reads each tensor with one `pread` into a buffer advised for 2 MiB pages (`empty_bytes`); on this VM faulting fresh 4 KiB pages cost more than the copy itself, which is why plain `torch.empty` buffers ran at 0.25 GB/s warm before that change.',
    '- The bf16 cast and the fp8 dequantization (256-entry table gather, then the per-channel multiply) are CPU-bound here: about 80-100 M parameters/s on one contended core.',
]

# Runs in a child process: measures one way of reading the model, prints a JSON line.
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
import cli  # binds `wanrt` to the checkout
import torch

def hwm_kb():  # peak RSS of this process image (ru_maxrss would include the parent's, kept across exec)
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))

method, root, files = sys.argv[1], sys.argv[2], sys.argv[3:]
rss0 = hwm_kb()
t0 = time.perf_counter()
nbytes = 0
if method == "sequential":
    buf = bytearray(1 << 20)  # cache-resident: the fastest plain read
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                nbytes += n
else:
    from wanrt.export.checkpoint.resolve import resolve_model
    dtype = {{"stream-fp32": None, "stream-bf16": torch.bfloat16}}[method]
    for expert in resolve_model(root).experts:
        for key, t in expert.view.iter_tensors(dtype):
            nbytes += t.numel() * t.element_size()
            del t
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "bytes": nbytes, "rss0_kb": rss0,
                  "peak_rss_kb": hwm_kb()}}))
"""


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(method: str, root: Path, files: list[Path]) -> dict:
    code = CHILD.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, method, str(root), *map(str, files)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Command:
    """One timed process: what the row says, its argv, folder and environment."""

    what: str
    args: tuple[str, ...]
    cwd: Path = REPO
    env: dict[str, str] | None = None
    goal: bool = False


def run_timed(cmd: Command) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system) of one run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd.args, cwd=cmd.cwd, env=cmd.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd.args)} exited with {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def timed_rounds(commands: list[Command], repeat: int) -> list[dict]:
    """Every command once per round, in a rotating order (so load swings hit all alike); medians and maxima."""
    walls: dict[str, list[float]] = {c.what: [] for c in commands}
    cpus: dict[str, list[float]] = {c.what: [] for c in commands}
    for r in range(repeat):
        for cmd in commands[r % len(commands):] + commands[: r % len(commands)]:
            wall, cpu = run_timed(cmd)
            walls[cmd.what].append(wall)
            cpus[cmd.what].append(cpu)
    return [{"what": c.what, "median_s": statistics.median(walls[c.what]), "max_s": max(walls[c.what]),
             "cpu_s": statistics.median(cpus[c.what]), "goal": c.goal} for c in commands]


def checkout_of(rev: str, work: Path) -> tuple[Path, str]:
    """The tree of commit `rev` unpacked under `work` (`git archive`: no worktree, no change to the repository)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    folder = work / f"rev-{sha}"
    if not (folder / "cli.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=tar, check=True)
    return folder, sha


def cached_bytecode_env(work: Path) -> dict[str, str]:
    """The environment with bytecode written and read (to a folder of its own: the checkout stays clean)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def ensure_model(path: Path, family: str, task: str, layout: str, dims: str, sparse: bool = False) -> Path:
    from wanrt.export.tiny import make_tiny_model

    if not path.exists():
        t0 = time.perf_counter()
        make_tiny_model(path, family, task, layout, seed=0, dims=dims, sparse=sparse)
        print(f"  wrote {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def bench_inspect(work: Path, repeat: int, baseline_rev: str | None = None) -> list[dict]:
    from safetensors import safe_open

    from wanrt.export.checkpoint.resolve import resolve_model

    def row(what: str, times: list[float]) -> dict:
        return {"what": what, "median_s": statistics.median(times), "max_s": max(times)}

    py = sys.executable
    cached = cached_bytecode_env(work)
    old = checkout_of(baseline_rev, work) if baseline_rev is not None else None
    commands = [Command("baseline: bare interpreter start (`python -c pass`)", (py, "-c", "pass")),
                Command("baseline: interpreter start with click (`python -c \"import click\"`)", (py, "-c", "import click"))]
    in_process: list[dict] = []
    for name, family, task in (("wan21-i2v-14B-sparse", "wan2.1", "i2v"), ("wan22-t2v-A14B-sparse", "wan2.2", "t2v")):
        root = ensure_model(work / name, family, task, "official", "14B", sparse=True)
        model = resolve_model(root)
        shards = [f for e in model.experts for f in e.files]
        apparent = sum(f.stat().st_size for f in shards) / 1e9
        inspect = (py, "cli.py", "inspect", str(root), "--json")
        commands.append(Command(
            f"`inspect --json` {family} {task} 14B dims: {len(model.experts)} expert(s), {len(shards)} shards ({apparent:.0f} GB),"
            f" {sum(len(e.view) for e in model.experts)} tensors + T5/VAE" + ("/CLIP" if model.image_encoder else ""), inspect, goal=True))
        if old is not None:
            commands.append(Command(f"  baseline: the same {family} {task} with the code of commit {old[1]}", inspect, cwd=old[0]))
        if family == "wan2.1":
            commands += [Command("baseline: bare interpreter start, bytecode cached", (py, "-c", "pass"), env=cached),
                         Command(f"  `inspect --json` {family} {task} 14B dims, bytecode cached (as installed)", inspect, env=cached)]
            run_timed(commands[-1])  # writes the bytecode
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            resolve_model(root)
            times.append(time.perf_counter() - t0)
        in_process.append(row(f"`resolve_model` in-process, {family} {task} folder", times))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for f in shards:
                with safe_open(str(f), framework="pt") as h:
                    list(h.keys())
            times.append(time.perf_counter() - t0)
        in_process.append(row("  baseline: safetensors `safe_open().keys()` on the same shards", times))
    return timed_rounds(commands, repeat) + in_process


def bench_load(work: Path, repeat: int) -> list[dict]:
    from wanrt.export.checkpoint.resolve import resolve_model

    cases = [
        (ensure_model(work / "wan21-t2v-1.3B-official", "wan2.1", "t2v", "official", "1.3B"), ("stream-fp32", "stream-bf16")),
        (ensure_model(work / "wan21-t2v-1.3B-lightx2v-fp8", "wan2.1", "t2v", "lightx2v-fp8", "1.3B"), ("stream-bf16",)),
    ]
    rows = []
    for root, methods in cases:
        experts = resolve_model(root).experts
        files = [f for e in experts for f in e.files]
        size = sum(f.stat().st_size for f in files)
        largest = max(r.numel * 4 for e in experts for r in e.view.values())  # as fp32
        for cache in ("cold", "warm"):
            runs: dict[str, list[dict]] = {}
            for _ in range(repeat):
                for method in ("sequential", *methods):
                    if cache == "cold":
                        drop_cache(files)
                    else:
                        run_child("sequential", root, files)  # make sure the bytes are cached
                    runs.setdefault(method, []).append(run_child(method, root, files))
            for method, rs in runs.items():
                best = min(rs, key=lambda r: r["seconds"])
                rows.append({
                    "folder": root.name, "file_gb": size / 1e9, "cache": cache, "method": method,
                    "seconds": best["seconds"], "gb_per_s": size / 1e9 / best["seconds"],
                    "worst_gb_per_s": size / 1e9 / max(r["seconds"] for r in rs),
                    "peak_rss_mb": max(r["peak_rss_kb"] for r in rs) / 1024,
                    "rss_after_imports_mb": max(r["rss0_kb"] for r in rs) / 1024, "out_gb": best["bytes"] / 1e9,
                    "largest_fp32_mb": largest / 2**20,
                })
                print(f"  {root.name} {cache} {method}: {rows[-1]['gb_per_s']:.2f} GB/s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    return rows


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) // 1024**2 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem} GB RAM, Python {platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    return (out.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def header(args: str) -> list[str]:
    return [
        f"Command: `python bench/inspect_load.py{args}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.date.today().isoformat()}, code of commit {commit()}; load average at start"
        f" {os.getloadavg()[0]:.1f} (machine shared with other jobs); PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', 'unset')}",
        "",
    ]


def inspect_report(rows: list[dict], args: str) -> str:
    lines = [MARKS["inspect"][0], "## Checkpoint inspect (`bench/inspect_load.py`)", "", *header(args),
             f"**inspect** (goal: median within {GOAL_S} s): wall time of a fresh process, median and max of the"
             " repeats, run in rotating rounds; CPU = median user + system seconds of the child. In-process rows at the end.",
             "", "| what | median s | max s | CPU s |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['cpu_s']:.3f} |" if "cpu_s" in r
              else f"| {r['what']} | {r['median_s']:.3f} | {r['max_s']:.3f} | - |" for r in rows]
    runs = [r for r in rows if r.get("goal")]
    median, worst = max(r["median_s"] for r in runs), max(r["max_s"] for r in runs)
    bare = next(r for r in rows if r["what"].startswith("baseline: bare"))
    verdict = "met" if median <= GOAL_S else "NOT met"
    cpu = max(r["cpu_s"] for r in runs)
    lines += ["", "Reading:", "",
              f"- inspect on the 14B-dimension folders: median {median:.3f} s (slowest run {worst:.3f} s),"
              f" {median - bare['median_s']:.3f} s above the bare interpreter start of the same run: goal (median within {GOAL_S} s) {verdict}.",
              f"- CPU time per inspect {cpu:.3f} s at most (bare interpreter {bare['cpu_s']:.3f} s): the wall time on an idle core;"
              " wall times above it are waits for a core on this shared machine (see the load average)."]
    for r, before in zip(rows, rows[1:]):
        if r.get("goal") and before["what"].lstrip().startswith("baseline: the same with the code of commit"):
            lines.append(f"- {r['what'].split(':')[0]} vs {before['what'].strip()[len('baseline: the same with the '):]}:"
                         f" {r['median_s']:.3f} s vs {before['median_s']:.3f} s wall, {r['cpu_s']:.3f} s vs {before['cpu_s']:.3f} s CPU.")
    lines += ["", "Notes:", "", *INSPECT_NOTES, MARKS["inspect"][1]]
    return "\n".join(lines)


def load_report(load_rows: list[dict], args: str) -> str:
    lines = [
        MARKS["load"][0],
        "## Checkpoint streaming load (`bench/inspect_load.py`)",
        "",
        *header(args),
        "**streaming load** (fresh process per run, best of the repeats, worst in its own column; GB/s = file bytes / wall time;"
        " `out GB` = bytes of the tensors handed out; sequential = `readinto` a reused 1 MiB buffer;"
        " RSS after imports = peak RSS (VmHWM) of the process with torch imported, before reading):",
        "",
        "| folder | file GB | cache | method | s | GB/s | worst GB/s | peak RSS MB | RSS after imports MB | out GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['folder']} | {r['file_gb']:.2f} | {r['cache']} | {r['method']} | {r['seconds']:.2f} | {r['gb_per_s']:.2f} | "
        f"{r['worst_gb_per_s']:.2f} | "
        f"{r['peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f} | {r['out_gb']:.2f} |"
        for r in load_rows
    ]
    lines += ["", "Reading:", ""]
    by = {(r["folder"], r["cache"], r["method"]): r for r in load_rows}
    for folder in dict.fromkeys(r["folder"] for r in load_rows):
        for cache in ("cold", "warm"):
            base = by.get((folder, cache, "sequential"))
            for method in ("stream-fp32", "stream-bf16"):
                r = by.get((folder, cache, method))
                if base and r:
                    lines.append(
                        f"- {folder} {cache} {method}: {r['gb_per_s'] / base['gb_per_s']:.2f}x the sequential read; "
                        f"peak RSS {r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} MB above the imports "
                        f"(largest tensor {r['largest_fp32_mb']:.0f} MB as fp32)."
                    )
    lines += ["", "Notes:", "", *LOAD_NOTES, MARKS["load"][1]]
    return "\n".join(lines)


def write_results(part: str, section: str) -> None:
    """Replace this part's section of bench/RESULTS.md (appended when absent)."""
    begin, end = MARKS[part]
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "_work", help="where the benchmark models are written")
    ap.add_argument("--repeat", type=int, default=5, help="inspect runs per folder")
    ap.add_argument("--load-repeat", type=int, default=2, help="load runs per method (the best is reported)")
    ap.add_argument("--skip-load", action="store_true", help="only the inspect part")
    ap.add_argument("--baseline-rev", help="also time inspect with the code of this commit (unpacked under --work)")
    ap.add_argument("--write-results", action="store_true", help="update this benchmark's section of bench/RESULTS.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    flags = (" --skip-load" if args.skip_load else "") + (f" --repeat {args.repeat}" if args.repeat != 5 else "")
    flags += f" --baseline-rev {args.baseline_rev}" if args.baseline_rev else ""
    sections = {"inspect": inspect_report(bench_inspect(args.work, args.repeat, args.baseline_rev), flags + " --write-results")}
    if not args.skip_load:
        sections["load"] = load_report(bench_load(args.work, args.load_repeat), flags + " --write-results")
    for part, section in sections.items():
        print(section)
        if args.write_results:
            write_results(part, section)


if __name__ == "__main__":
    main()
