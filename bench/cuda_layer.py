"""The runtime's cuda-python layer (`runtime/cuda.py`) on a real NVIDIA GPU: every function of it, checked and timed.

One command, no TensorRT needed (only cuda-python and a driver):

    python bench/cuda_layer.py [--device 0] [--mib 256] [--repeats 20] [--json] [--record]

What it does, in order (each step checks its result and says so):
1. `no_device_reason`, `device_info`, `memory_info`: the GPU, its compute capability, free/total memory.
2. The shared activation pool through the TensorRT backend's own pool code (`TensorRTBackend.allocate_activations`,
   `ensure_activations` growing it, `free_activations`), without TensorRT: cudaMalloc / cudaFree, and the
   free memory seen by cudaMemGetInfo going down by the pool and back up.
3. A pinned host <-> device round trip on the backend's one stream (`PinnedBuffer`, `copy_to_device`,
   `copy_to_host`, `Stream.synchronize`), ordered and timed by `Event`s; the data must come back exact.
4. Copy bandwidth, host -> device and device -> host, pinned and pageable (numpy) memory, at the DiT
   latent sizes of 480p and 720p (Wan2.1, 81 frames, fp32) and at `--mib`.
5. Per-step host overhead of the runtime's I/O path for a DiT step, without an engine: latent,
   timestep and context staged into pinned buffers and copied in, noise_pred copied out, events
   around the (empty) engine slot, one synchronize, the output copied to a fresh numpy array; the
   wall time per step, the device time of the copies (events), and the difference (host overhead),
   at 480p and 720p.
6. A CUDA graph (`capture_graph`, `Graph.launch`, `Graph.destroy`) of a pinned -> device -> pinned copy:
   replayed after the source changes, the destination must follow.
7. `CudaOutOfMemory`: asking for more than the total memory gives the one-line error with the numbers.

`--record` writes the result as the `bench/cuda_layer.py` section of bench/RESULTS.md (other sections kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

from wanrt.runtime import cuda  # noqa: E402
from wanrt.runtime.backends.tensorrt import TensorRTBackend, TensorRTProbe  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
SECTION_BEGIN, SECTION_END = "<!-- cuda_layer:begin -->", "<!-- cuda_layer:end -->"
LATENTS = {"480p": (1, 16, 21, 60, 104), "720p": (1, 16, 21, 90, 160)}  # Wan2.1 VAE, 81 frames
CONTEXT = (1, 512, 4096)


def bandwidth(nbytes: int, repeats: int, stream: cuda.Stream, device: cuda.DeviceBuffer, pinned: cuda.PinnedBuffer) -> dict:
    """GB/s host->device and device->host, pinned and pageable, timed by events on the stream."""
    pageable = np.ones(nbytes, np.uint8)
    start, end = cuda.Event(), cuda.Event()
    out = {}
    for label, host in (("pinned", pinned), ("pageable", pageable)):
        for direction in ("h2d", "d2h"):
            copy = (lambda: cuda.copy_to_device(device.ptr, host, nbytes, stream)) if direction == "h2d" else (
                lambda: cuda.copy_to_host(host, device.ptr, nbytes, stream))  # fmt: skip
            copy()  # warm
            stream.synchronize()
            start.record(stream)
            for _ in range(repeats):
                copy()
            end.record(stream)
            end.synchronize()
            out[f"{direction}_{label}_gb_s"] = nbytes * repeats / end.seconds_since(start) / 1e9
    start.destroy()
    end.destroy()
    return out


def step_overhead(latent_shape: tuple[int, ...], repeats: int, stream: cuda.Stream) -> dict:
    """The runtime's per-step I/O path for a DiT call without an engine (module docstring, step 5)."""
    rng = np.random.default_rng(0)
    feeds = {
        "latent": rng.standard_normal(latent_shape, dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "context": rng.standard_normal(CONTEXT, dtype=np.float32),
    }
    sizes = {**{n: a.nbytes for n, a in feeds.items()}, "noise_pred": feeds["latent"].nbytes}
    device = {n: cuda.DeviceBuffer.allocate(b, n) for n, b in sizes.items()}
    pinned = {n: cuda.PinnedBuffer.allocate(b, n) for n, b in sizes.items()}
    first, start, end, last = cuda.Event(), cuda.Event(), cuda.Event(), cuda.Event()
    walls, copies = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        first.record(stream)
        for name, value in feeds.items():
            np.copyto(pinned[name].array(value.shape, value.dtype), value)
            cuda.copy_to_device(device[name].ptr, pinned[name], value.nbytes, stream)
        start.record(stream)
        end.record(stream)  # the engine would run between these two events
        cuda.copy_to_host(pinned["noise_pred"], device["latent"].ptr, sizes["noise_pred"], stream)
        last.record(stream)
        stream.synchronize()
        out = np.array(pinned["noise_pred"].array(latent_shape, np.float32), copy=True)
        t1 = time.perf_counter()
        if i:  # the first round is a warm-up
            walls.append(t1 - t0)
            copies.append(last.seconds_since(first) - end.seconds_since(start))
        assert np.array_equal(out, feeds["latent"])
    for buf in (*device.values(), *pinned.values()):
        buf.free()
    for e in (first, start, end, last):
        e.destroy()
    wall, device_copies = float(np.median(walls)), float(np.median(copies))
    return {
        "latent_shape": list(latent_shape),
        "bytes_in": sum(a.nbytes for a in feeds.values()),
        "bytes_out": sizes["noise_pred"],
        "wall_ms_median": 1e3 * wall,
        "device_copies_ms_median": 1e3 * device_copies,
        "host_overhead_ms": 1e3 * (wall - device_copies),
    }


def exercise(device_index: int = 0, mib: int = 256, repeats: int = 20) -> dict:
    """Every function of runtime/cuda.py, checked; returns the numbers (raises on a wrong result)."""
    reason = cuda.no_device_reason()
    if reason is not None:
        raise SystemExit(f"bench/cuda_layer.py needs an NVIDIA GPU: {reason}")
    info = cuda.device_info(device_index)
    report: dict = {"device": info.name, "compute_capability": info.compute_capability, "total_bytes": info.total_bytes}
    backend = TensorRTBackend(device_index, probe=TensorRTProbe(info, ()))  # the backend's pool code, no TensorRT needed
    stream = backend.stream
    report["stream_handle"] = stream.handle  # the integer execute_async_v3 gets; nonzero for a created stream

    # 2. the shared activation pool
    free0, _ = cuda.memory_info()
    pool = backend.allocate_activations([], ROOT, size_bytes=512 * MIB)
    memory = backend.ensure_activations(pool, 1 * GIB)  # grows: free, malloc again, new generation
    free1, _ = cuda.memory_info()
    backend.free_activations(pool)
    free2, _ = cuda.memory_info()
    report["pool"] = {"bytes": 1 * GIB, "generation": memory.generation, "free_drop_bytes": free0 - free1, "free_back_bytes": free2 - free1}
    report["pool_freed"] = pool.freed and free0 - free1 >= GIB and free2 - free1 >= GIB - 64 * MIB and memory.generation == 2

    # 3. pinned round trip ordered by events
    nbytes = mib * MIB
    device = cuda.DeviceBuffer.allocate(nbytes, "the bandwidth buffer")
    pinned = cuda.PinnedBuffer.allocate(nbytes, "the bandwidth staging buffer")
    back = cuda.PinnedBuffer.allocate(nbytes, "the round-trip destination")
    src = pinned.array((nbytes // 4,), np.float32)
    src[:] = np.random.default_rng(1).standard_normal(nbytes // 4, dtype=np.float32)
    before, after = cuda.Event(), cuda.Event()
    before.record(stream)
    cuda.copy_to_device(device.ptr, pinned, nbytes, stream)
    cuda.copy_to_host(back, device.ptr, nbytes, stream)
    after.record(stream)
    after.synchronize()
    report["round_trip_exact"] = bool(np.array_equal(back.array((nbytes // 4,), np.float32), src))
    report["round_trip_ms"] = 1e3 * after.seconds_since(before)

    # 4. bandwidth, 5. per-step host overhead
    report["bandwidth"] = {f"{mib}MiB": bandwidth(nbytes, repeats, stream, device, pinned)}
    for res, shape in LATENTS.items():
        latent_bytes = int(np.prod(shape)) * 4
        report["bandwidth"][f"latent_{res}"] = bandwidth(latent_bytes, repeats, stream, device, pinned)
        report.setdefault("step_io", {})[res] = step_overhead(shape, repeats, stream)

    # 6. a CUDA graph of pinned -> device -> pinned
    small = 4 * MIB
    src_small = pinned.array((small // 4,), np.float32)
    src_small[:] = 1.0
    graph = cuda.capture_graph(stream, lambda: (
        cuda.copy_to_device(device.ptr, pinned, small, stream), cuda.copy_to_host(back, device.ptr, small, stream)))  # fmt: skip
    src_small[:] = 7.0  # the graph reads the buffer when it runs, not when it was captured
    graph.launch(stream)
    stream.synchronize()
    report["graph_replay_exact"] = bool(np.all(back.array((small // 4,), np.float32) == 7.0))
    graph.destroy()

    # 7. out of memory, one line with the numbers
    try:
        cuda.DeviceBuffer.allocate(info.total_bytes * 2, "a buffer larger than the GPU")
        report["oom_line"] = None
    except cuda.CudaOutOfMemory as e:
        report["oom_line"] = str(e)
        assert e.requested_bytes == info.total_bytes * 2 and e.free_bytes is not None and "\n" not in str(e)
    for buf in (device, pinned, back):
        buf.free()
    for e in (before, after):
        e.destroy()
    backend.close()
    return report


def markdown(report: dict, command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        SECTION_BEGIN,
        "## The cuda-python layer on a GPU (`bench/cuda_layer.py`)",
        "",
        f"{report['device']} (compute capability {report['compute_capability']}, {report['total_bytes'] / GIB:.1f} GiB),"
        f" {platform.machine()}, {datetime.date.today().isoformat()}, commit {commit}. Command: `{command}`.",
        "",
        f"- activation pool: 1 GiB allocated (grown from 512 MiB: generation {report['pool']['generation']}), free memory"
        f" fell by {report['pool']['free_drop_bytes'] / GIB:.2f} GiB and came back by {report['pool']['free_back_bytes'] / GIB:.2f}"
        f" GiB: {'ok' if report['pool_freed'] else 'FAILED'}",
        f"- pinned round trip exact: {report['round_trip_exact']} ({report['round_trip_ms']:.2f} ms);"
        f" CUDA graph replay exact: {report['graph_replay_exact']}",
        f"- out of memory: `{report['oom_line']}`",
        "",
        "| buffer | H2D pinned GB/s | D2H pinned GB/s | H2D pageable GB/s | D2H pageable GB/s |",
        "|---|---|---|---|---|",
    ]
    for name, b in report["bandwidth"].items():
        lines.append(f"| {name} | {b['h2d_pinned_gb_s']:.1f} | {b['d2h_pinned_gb_s']:.1f} | {b['h2d_pageable_gb_s']:.1f} | {b['d2h_pageable_gb_s']:.1f} |")
    lines += [
        "", "| DiT step I/O (no engine) | bytes in | bytes out | wall ms / step | device copies ms | host overhead ms |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for res, s in report["step_io"].items():
        lines.append(
            f"| {res} {s['latent_shape']} | {s['bytes_in']} | {s['bytes_out']} | {s['wall_ms_median']:.3f}"
            f" | {s['device_copies_ms_median']:.3f} | {s['host_overhead_ms']:.3f} |"
        )
    lines.append(SECTION_END)
    return "\n".join(lines)


def record(block: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    pattern = re.compile(re.escape(SECTION_BEGIN) + ".*?" + re.escape(SECTION_END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--mib", type=int, default=256, help="size of the bandwidth buffer")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--record", action="store_true", help="write the section of bench/RESULTS.md")
    args = parser.parse_args()
    report = exercise(args.device, args.mib, args.repeats)
    command = "python bench/cuda_layer.py " + " ".join(sys.argv[1:])
    print(json.dumps(report, indent=2) if args.json else markdown(report, command.strip()))
    if args.record:
        record(markdown(report, command.strip()))
    ok = report["pool_freed"] and report["round_trip_exact"] and report["graph_replay_exact"] and report["oom_line"]
    ok = ok and report["stream_handle"] != 0
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
