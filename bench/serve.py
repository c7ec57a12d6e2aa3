"""Benchmark `cli.py serve` (1 and 2 replicas) against `cli.py run` called in a loop, on the tiny model.

The same N generations (same prompt and size, seeds 0..N-1) three ways, in one run:
  * `run` in a loop: one `python cli.py run` process per video, one after the other (what a shell loop does);
  * `serve --replicas 1` and `serve --replicas 2`: all N requests posted at once, polled until done.
Latency: per video, from the process start (run) or the POST (serve) to its mp4.  Throughput: N videos
over the wall time from the first start/POST to the last mp4.  Serve's start-up (Ray, replicas) is
reported apart, not counted.  Prints a markdown section for bench/RESULTS.md.

    python bench/serve.py [--bundle BUNDLE] [--videos 8]

Without --bundle, the tiny model is made and built once under --workdir (make-tiny-model, build-engine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

REQUEST = {"prompt": "a red fox running through fresh snow", "frames": 17, "height": 128, "width": 128, "steps": 8}


def ensure_bundle(work: Path) -> Path:
    """The tiny Wan2.2 MoE t2v model, built to a bundle once (the README's main job)."""
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        for args in (["make-tiny-model", str(work / "model"), "--family", "wan2.2", "--task", "t2v"],
                     ["build-engine", str(work / "model"), "-o", str(bundle)]):  # fmt: skip
            subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, check=True, capture_output=True)
    return bundle


def run_loop(bundle: Path, work: Path, n: int) -> tuple[float, list[float]]:
    """(wall seconds, per-video seconds) of `cli.py run` once per video, in sequence."""
    latencies = []
    start = time.perf_counter()
    for seed in range(n):
        t = time.perf_counter()
        args = [f"--{k}={v}" for k, v in REQUEST.items()] + [f"--seed={seed}", "-o", str(work / f"run-{seed}.mp4")]
        subprocess.run([sys.executable, "cli.py", "run", str(bundle), *args], cwd=ROOT, check=True, capture_output=True)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


def http(method: str, url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def serve_loop(bundle: Path, work: Path, n: int, replicas: int, timeout: float = 1800) -> tuple[float, float, list[float]]:
    """(start-up seconds, wall seconds, per-video seconds) of N requests posted at once to `serve --replicas R`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "cli.py", "serve", str(bundle), "--replicas", str(replicas), "--port", str(port),
         "--max-queue", str(n), "--output-dir", str(work / f"serve-{replicas}"), "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = ""
        while not line.startswith("{"):  # the settings line (--json)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"serve exited with {proc.returncode}"
        url = json.loads(line)["url"]
        startup = time.perf_counter() - t0
        posted, done = {}, {}
        start = time.perf_counter()
        for seed in range(n):
            posted[http("POST", f"{url}/v1/videos", {**REQUEST, "seed": seed})["id"]] = time.perf_counter()
        deadline = start + timeout
        while len(done) < n and time.perf_counter() < deadline:
            for job_id in set(posted) - set(done):
                status = http("GET", f"{url}/v1/videos/{job_id}")["status"]
                if status in ("done", "failed", "cancelled"):
                    assert status == "done", f"job {job_id} {status}"
                    done[job_id] = time.perf_counter()
            time.sleep(0.05)
        assert len(done) == n, f"{n - len(done)} jobs unfinished after {timeout} s"
        return startup, max(done.values()) - start, [done[j] - posted[j] for j in posted]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    import ray

    return f"{cpu}, {os.cpu_count()} cores, {mem} GB RAM, Python {platform.python_version()}, ray {ray.__version__}"


def report(rows: list[tuple[str, float | None, float, list[float]]], n: int, loads: tuple[str, str], args: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    req = ", ".join(f"{k} {v}" for k, v in REQUEST.items() if k != "prompt")
    lines = [
        "## Serving throughput and latency (`bench/serve.py`)",
        "",
        f"Command: `python bench/serve.py {args}`".rstrip() + "  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.date.today()}, commit {commit}; load average at start {loads[0]}, at the end {loads[1]}"
        " (1/5/15 min; the machine was shared with other jobs)  ",
        f"Workload: {n} videos of the tiny Wan2.2 MoE t2v bundle (make-tiny-model + build-engine), {req}, seeds 0..{n - 1}.",
        "`run` loop: one `cli.py run` process per video, in sequence (each pays interpreter start, imports, verify and"
        " engine loading); serve: all requests posted at once; latency = POST to done (so it includes queueing).",
        "",
        "| how | start-up s | wall s | videos/min | p50 latency s | p95 latency s |",
        "|---|---|---|---|---|---|",
    ]
    for label, startup, wall, lat in rows:
        lines.append(f"| {label} | {'-' if startup is None else f'{startup:.1f}'} | {wall:.1f} | {60 * n / wall:.1f} |"
                     f" {statistics.median(lat):.2f} | {p95(lat):.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle to serve (default: the tiny model, built once)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wanrt-bench-serve"))
    ap.add_argument("--videos", type=int, default=8)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    bundle = a.bundle or ensure_bundle(a.workdir)
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = [("`run` in a loop", None, *run_loop(bundle, a.workdir, a.videos))]
    for replicas in (1, 2):
        startup, wall, lat = serve_loop(bundle, a.workdir, a.videos, replicas)
        rows.append((f"`serve --replicas {replicas}`", startup, wall, lat))
    load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(report(rows, a.videos, (load_start, load_end), " ".join(sys.argv[1:])))


if __name__ == "__main__":
    main()
