"""One DiT denoising step at Wan2.1 T2V-1.3B dimensions: the runtime (ONNX Runtime) vs diffusers eager.

Shape (issue 6): 5 frames at 240x416 -> latent 2x30x52 -> 780 tokens; a guided step (CFG, batch 2:
[cond, uncond]) with random 1.3B-dimension weights (dim 1536, 30 layers, text_dim 4096).  In one run:

1. diffusers `WanTransformer3DModel` eager, fp32: forward + CFG + `UniPCMultistepScheduler.step`;
2. the same weights exported to ONNX (`export.onnx.dit.export_dit_onnx`, fp32) and run by the
   runtime: `runtime.guidance.predict_velocity` + `runtime.schedulers.FlowUniPC.step`, with the
   engine time and the runtime's host overhead per step (wall time not spent inside the engine);
3. diffusers eager in bf16 (the model cast in place), unless `--skip-bf16`;
4. the int8 and fp8 W8A8 graphs (`--quantize`, default both): the same weights through the export's
   weight Q/DQ pass (`calibration.qdq.weight_qdq_pass`: per-channel codes, DequantizeLinear axis 1),
   activation scales from the graph's own amax outputs on one calibration batch of other random
   inputs (seed 1, timesteps 999 and 500; the sampling-trajectory calibration of build-engine needs a
   text encoder, which this bench has not), then Q/DQ in front of each quantized MatMul
   (`bench/qgraphs.py`); run by the runtime like the fp32 graph, their output compared with
   diffusers fp32 (relative L2, cosine).  Every graph is exported while the diffusers model is
   alive; the W8A16 graphs are calibrated, and all graphs run, after it is freed (5.7 GB at 30
   blocks), so only one big thing is resident at a time.

The runtime's output is checked against diffusers fp32 (max relative error) so both sides compute
the same step.  Prints a markdown block; `--record` writes it as the `bench/step.py` section of
bench/RESULTS.md (other sections are kept).

    .venv/bin/python bench/step.py [--dims 1.3b|tiny] [--batch 2] [--repeats 2] [--warmup 1] [--threads N]
                                   [--skip-bf16] [--quantize int8,fp8] [--layers N] [--record]

The exported ONNX is kept in bench/_work/step-<dims>/ (the weights are seeded, so it is reused by
later runs; `--fresh` re-exports).  Order: diffusers fp32, runtime, then diffusers bf16 (slowest
on CPUs without bf16 instructions), each printed as it finishes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)
from qgraphs import calibrate_w8a8, compare, export_graph  # noqa: E402  (bench/ is on sys.path: this script's folder)

DIMS = {
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096),
    "tiny": dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64),
}
SECTION = "## bench/step.py"


class TensorView(Mapping):
    """Official key -> tensor, readable by the exporter (`view[k].shape`, `view.load(k, dtype)`)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __getitem__(self, key):
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def load(self, key, dtype):
        return self.tensors[key].to(dtype)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def diffusers_model(cfg, seed: int):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim,
        out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, eps=cfg.eps,
    ).eval().requires_grad_(False)  # fmt: skip


def official_view(model) -> TensorView:
    from wanrt.export.checkpoint.keys import DIFFUSERS_IGNORED, diffusers_to_official

    state = {}
    for key, t in model.state_dict().items():
        if not DIFFUSERS_IGNORED.match(key):
            state[diffusers_to_official(key)] = t
    return TensorView(state)


def time_diffusers(model, inputs, guide: float, repeats: int, warmup: int, dtype) -> tuple[list[float], "object"]:
    """Seconds per guided step (forward, CFG, UniPC step) of diffusers eager; and the last velocity."""
    import torch
    from diffusers import UniPCMultistepScheduler

    latent = inputs["latent"]
    batch = latent.shape[0]
    x = torch.from_numpy(latent[:1]).to(dtype)
    ts = torch.from_numpy(inputs["timestep"])
    ctx = torch.from_numpy(inputs["context"]).to(dtype)
    times, velocity = [], None
    for _ in range(repeats + warmup):
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        sched.set_timesteps(2)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(x.expand(batch, *x.shape[1:]), ts, ctx, return_dict=False)[0].float()
        v = out[:1] if batch == 1 else out[1:] + guide * (out[:1] - out[1:])
        sched.step(v, sched.timesteps[0], x.float(), return_dict=False)
        times.append(time.perf_counter() - start)
        velocity = out
    return times[warmup:], velocity.numpy()


def time_runtime(graph: Path, signature, inputs, guide: float, repeats: int, warmup: int, threads: int):
    """Per-step wall, engine and host-overhead seconds of the runtime on `graph`; its raw engine output."""
    import numpy as np

    from wanrt.engines.manifest import Component
    from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions
    from wanrt.runtime.guidance import StepPlan, predict_velocity
    from wanrt.runtime.schedulers import make_sampler

    onnx_dir = graph.parent
    files = sorted(str(p.relative_to(onnx_dir)) for p in onnx_dir.iterdir())
    comp = Component("dit", "dit", graph.name, signature, "fp32", files=files)
    backend = OnnxRuntimeBackend(OrtOptions(device="auto", intra_op_threads=threads))
    start = time.perf_counter()
    engine = backend.load(comp, onnx_dir)
    load_s = time.perf_counter() - start
    batch = inputs["latent"].shape[0]
    step = StepPlan(0, float(inputs["timestep"][0]), "dit", guide, batch == 2)
    x = inputs["latent"][:1]
    walls, engines = [], []
    for _ in range(repeats + warmup):
        sampler = make_sampler("unipc", 2, 5.0)
        before = engine.run_seconds
        start = time.perf_counter()
        v, _ = predict_velocity(engine, step, x, inputs["timestep"][:1], inputs["context"][:1],
                                inputs["context"][1:2] if batch == 2 else None)  # fmt: skip
        sampler.step(v, x)
        walls.append(time.perf_counter() - start)
        engines.append(engine.run_seconds - before)
    raw = engine.run({k: v for k, v in inputs.items()})["noise_pred"]
    engine.release()
    return walls[warmup:], engines[warmup:], load_s, backend.describe(), np.asarray(raw)


def fmt(xs: list[float]) -> str:
    return f"{min(xs):.3f}" if len(xs) == 1 else f"{min(xs):.3f} (median {sorted(xs)[len(xs) // 2]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", choices=sorted(DIMS), default="1.3b")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--batch", type=int, choices=(1, 2), default=2, help="2: CFG [cond, uncond] in one call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="re-export even if bench/_work holds the ONNX")
    ap.add_argument("--quantize", default="int8,fp8", help="comma list of W8A8 graphs to time ('' for none)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of DiT blocks (the widths stay)")
    ap.add_argument("--record", action="store_true", help="write the result into bench/RESULTS.md")
    args = ap.parse_args()

    import numpy as np
    import torch

    from wanrt.engines.model import DiTConfig
    from wanrt.export.models.wan_dit import signature_for
    from wanrt.runtime.sizes import VideoGeometry

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    dims = dict(DIMS[args.dims], **({"num_layers": args.layers} if args.layers else {}))
    cfg = DiTConfig(in_dim=16, out_dim=16, **dims)
    schemes = [q for q in args.quantize.split(",") if q]
    geo = VideoGeometry(args.frames, args.height, args.width, (4, 8, 8))
    rng = np.random.default_rng(0)
    inputs = {
        "latent": np.repeat(rng.standard_normal(geo.latent_shape(16), dtype=np.float32), args.batch, axis=0),
        "timestep": np.full((args.batch,), 999.0, np.float32),
        "context": rng.standard_normal((args.batch, cfg.text_len, cfg.text_dim), dtype=np.float32),
    }
    guide = 5.0
    result: dict = {"dims": args.dims, "layers": cfg.num_layers, "tokens": geo.tokens, "batch": args.batch, "threads": threads}
    work = ROOT / "bench" / "_work" / f"step-{args.dims}{f'-{args.layers}l' if args.layers else ''}"
    onnx_dir = work / "dit"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    model = diffusers_model(cfg, seed=0)
    result["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    say(f"model: {result['params_b']:.3f} B params, {geo.tokens} tokens, batch {args.batch} ({time.perf_counter() - t0:.0f} s)")

    fp32_times, ref = time_diffusers(model, inputs, guide, args.repeats, args.warmup, torch.float32)
    result["diffusers_fp32_s"] = fp32_times
    say(f"diffusers fp32 step: {fmt(fp32_times)} s")

    # every graph is exported while the diffusers model is alive (its weights are the source) ...
    graph, export_s = export_graph(official_view(model), cfg, onnx_dir, None, args.fresh)
    if export_s is not None:
        result["export_s"] = export_s
    result["onnx_gb"] = sum(p.stat().st_size for p in onnx_dir.iterdir()) / 1e9
    say(f"ONNX {result['onnx_gb']:.2f} GB" + (f", exported in {export_s:.0f} s" if export_s is not None else " (cached)"))
    w8a16 = {}
    for scheme in schemes:
        q = result.setdefault("quantized", {}).setdefault(scheme, {})
        w8a16[scheme], export_s = export_graph(official_view(model), cfg, work / f"w8a16-{scheme}", scheme, args.fresh)
        if export_s is not None:
            q["export_s"] = export_s
    del model
    gc.collect()
    # ... and calibrated, then run, after it is freed (at 30 blocks it holds 5.7 GB)
    quantized = {}
    for scheme in schemes:
        quantized[scheme], _, calib_s = calibrate_w8a8(w8a16[scheme], scheme, [calibration_feeds(geo, cfg)], threads, args.fresh)
        if calib_s is not None:
            result["quantized"][scheme]["calibrate_s"] = calib_s
        say(f"{scheme} W8A8 graph: {times_text(result['quantized'][scheme]) or 'cached'}")

    walls, engines, load_s, device, raw = time_runtime(
        graph, signature_for(cfg), inputs, guide, args.repeats, args.warmup, threads
    )
    result.update(runtime_s=walls, runtime_engine_s=engines, runtime_load_s=load_s, runtime_device=device)
    result["runtime_host_ms"] = [1e3 * (w - e) for w, e in zip(walls, engines)]
    result["max_rel_err_vs_diffusers_fp32"] = float(np.abs(raw - ref).max() / np.abs(ref).max())
    say(f"runtime step: {fmt(walls)} s, host overhead {fmt(result['runtime_host_ms'])} ms")
    gc.collect()

    for scheme, qgraph in quantized.items():
        walls, engines, load_s, _, raw_q = time_runtime(qgraph, signature_for(cfg), inputs, guide, args.repeats, args.warmup, threads)
        q = result["quantized"][scheme]
        err = compare(raw_q, ref)
        q.update(runtime_s=walls, load_s=load_s, rel_l2_vs_diffusers_fp32=err["rel_l2"], cosine_vs_diffusers_fp32=err["cosine"],
                 onnx_gb=sum(p.stat().st_size for p in (qgraph, qgraph.parent / "model.onnx.data")) / 1e9)  # fmt: skip
        say(f"runtime {scheme} W8A8 step: {fmt(walls)} s, rel L2 vs diffusers fp32 {q['rel_l2_vs_diffusers_fp32']:.2e}")
        gc.collect()

    if not args.skip_bf16:
        model = diffusers_model(cfg, seed=0).to(torch.bfloat16)
        bf16_times, _ = time_diffusers(model, inputs, guide, args.repeats, args.warmup, torch.bfloat16)
        result["diffusers_bf16_s"] = bf16_times
        say(f"diffusers bf16 step: {fmt(bf16_times)} s")
        del model
    result["peak_rss_gb"] = peak_rss_gb()

    block = markdown(result)
    print(block)
    say(json.dumps(result))
    if args.record:
        record(block)


def calibration_feeds(geo, cfg) -> dict:
    """The one calibration batch of the W8A8 graphs: other random inputs (seed 1), timesteps 999 and 500."""
    import numpy as np

    rng = np.random.default_rng(1)
    return {"latent": rng.standard_normal((2, *geo.latent_shape(16)[1:]), dtype=np.float32),
            "timestep": np.array([999.0, 500.0], np.float32),
            "context": rng.standard_normal((2, cfg.text_len, cfg.text_dim), dtype=np.float32)}  # fmt: skip


def times_text(q: dict) -> str:
    """'export 12 s, calibration 3 s' for what this run did of a quantized graph ('' when both were cached)."""
    done = [(what, q[key]) for what, key in (("export", "export_s"), ("calibration", "calibrate_s")) if key in q]
    return ", ".join(f"{what} {s:.0f} s" for what, s in done)


def markdown(r: dict) -> str:
    """The RESULTS.md section for one run."""
    cpu = platform.processor() or platform.machine()
    best = min(r["runtime_s"])
    rows = [
        ("diffusers eager fp32", r["diffusers_fp32_s"]),
        *([("diffusers eager bf16", r["diffusers_bf16_s"])] if "diffusers_bf16_s" in r else []),
        (f"runtime ({r['runtime_device']})", r["runtime_s"]),
        *[(f"runtime {s} W8A8 ({r['runtime_device']})", q["runtime_s"]) for s, q in r.get("quantized", {}).items()],
    ]
    lines = [
        SECTION,
        "",
        f"One DiT step at {'Wan2.1 T2V-1.3B' if r['dims'] == '1.3b' else r['dims']} dims, {r['layers']} blocks "
        f"({r['params_b']:.3f} B params, random weights), "
        f"5 frames 240x416 = {r['tokens']} tokens, batch {r['batch']} ({'CFG in one call' if r['batch'] == 2 else 'no CFG'}); "
        f"{r['threads']} threads on {cpu} ({os.cpu_count()} cores), {datetime.date.today()}. "
        f"Min (median) of {len(r['runtime_s'])} timed runs.",
        "",
        "| path | s / step | vs diffusers fp32 |",
        "|---|---|---|",
    ]
    base = min(r["diffusers_fp32_s"])
    lines += [f"| {name} | {fmt(ts)} | {base / min(ts):.2f}x |" for name, ts in rows]
    lines += [
        "",
        f"- runtime host overhead per step (wall - engine: binding, CFG arithmetic, UniPC update): "
        f"{fmt(r['runtime_host_ms'])} ms = {100 * min(r['runtime_host_ms']) / 1e3 / best:.2f}% of the step",
        f"- runtime output vs diffusers fp32: max |diff| / max |ref| = {r['max_rel_err_vs_diffusers_fp32']:.1e}",
        f"- ONNX {r['onnx_gb']:.2f} GB" + (f" (export {r['export_s']:.0f} s)" if "export_s" in r else "")
        + f", session load {r['runtime_load_s']:.1f} s, peak RSS {r['peak_rss_gb']:.1f} GB"
        + ("" if "diffusers_bf16_s" in r else "; diffusers bf16 not run (--skip-bf16)"),
        *[f"- {s} W8A8 vs diffusers fp32: relative L2 {q['rel_l2_vs_diffusers_fp32']:.2e}, cosine "
          f"{q['cosine_vs_diffusers_fp32']:.6f}; ONNX {q['onnx_gb']:.2f} GB, session load {q['load_s']:.1f} s"
          + (f", {times_text(q)}" if times_text(q) else "")
          for s, q in r.get("quantized", {}).items()],
        "",
    ]
    return "\n".join(lines)


def record(block: str, section: str = SECTION) -> None:
    """Replace (or append) the `section` section of bench/RESULTS.md, keeping the others."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
