"""Quality of the int8 / fp8 DiT graphs at Wan2.1 T2V-1.3B widths: each block's output vs the fp32 graph.

Random 1.3B-width weights (dim 1536, ffn 8960, 12 heads, text_dim 4096; `--layers` blocks, default
4) made as `bench/step.py` makes them (a seeded diffusers `WanTransformer3DModel`, read through the
official key names), exported by the build's DiT export to five graphs: fp32, int8 W8A16, int8
W8A8, fp8 W8A16, fp8 W8A8 (`bench/qgraphs.py`: the build's weight Q/DQ pass, range collection and
activation Q/DQ).  Activation scales (`max`) come from one calibration set of random inputs (seed 1:
latents, a random text context, timesteps 999/750/500/250 in two batch-2 calls); the bench has no
full-size text encoder, so this is not the build's trajectory calibration.  Every graph then runs
in ONNX Runtime (CPU, the runtime's session options) on held-out inputs (other seeds and
timesteps) with the residual stream after each block added as an extra graph output, and each
block's output and the final `noise_pred` are compared with the fp32 graph's (cosine, relative L2;
the errors accumulate through the blocks, as in a real run).

Random weights lack the activation outliers of trained models (a few channels 100x the rest in
trained DiTs), which are what makes per-tensor activation scales lose precision; so these numbers
bound the mechanics (codes, scales, axes, Q/DQ placement, ONNX Runtime's kernels), not the quality
of a trained model.

    python bench/quant_quality.py [--layers 4] [--schemes int8,fp8] [--eval-seeds 2,3] [--threads N] [--fresh] [--record]

Graphs are kept in bench/_work/quality-<layers>l/ (seeded weights: reused unless --fresh).
`--record` writes the `bench/quant_quality.py` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qgraphs import block_outputs, calibrate_w8a8, compare, export_graph, session, with_outputs  # noqa: E402
from step import DIMS, ROOT, diffusers_model, official_view, peak_rss_gb, record  # noqa: E402  (binds wanrt)

SECTION = "## bench/quant_quality.py"
CALIB_SEED, CALIB_TIMESTEPS = 1, ((999.0, 750.0), (500.0, 250.0))
EVAL_TIMESTEPS = ((900.0, 400.0), (700.0, 100.0))  # per held-out seed, cycled
CAVEAT = ("Random weights lack the activation outliers of trained models, so these numbers bound the "
          "mechanics (codes, scales, Q/DQ placement, kernels), not trained-model quality.")  # fmt: skip


def feeds(seed: int, timesteps: tuple[float, float], latent_shape, cfg) -> dict:
    """One batch-2 DiT call of seeded random inputs (a latent, a unit-variance text context, two timesteps)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"latent": rng.standard_normal((2, *latent_shape[1:]), dtype=np.float32),
            "timestep": np.array(timesteps, np.float32),
            "context": rng.standard_normal((2, cfg.text_len, cfg.text_dim), dtype=np.float32)}  # fmt: skip


def run_with_blocks(graph: Path, inputs: list[dict], threads: int, optimization: str = "all") -> list[list]:
    """Per input set: [block 0 output, ..., block N-1 output, noise_pred] of `graph` in ONNX Runtime."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    blocks = block_outputs(model)
    sess = session(graph, threads, with_outputs(model, blocks), optimization)
    names = [*blocks, "noise_pred"]
    out = [sess.run(names, f) for f in inputs]
    del sess
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", choices=sorted(DIMS), default="1.3b", help="tiny: a quick check of the script")
    ap.add_argument("--layers", type=int, default=4, help="DiT blocks (the widths stay 1.3B's)")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--schemes", default="int8,fp8")
    ap.add_argument("--eval-seeds", default="2,3", help="held-out input seeds (the calibration set is seed 1)")
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--fresh", action="store_true", help="re-export and recalibrate even if bench/_work holds the graphs")
    ap.add_argument("--record", action="store_true", help="write the result into bench/RESULTS.md")
    args = ap.parse_args()

    import torch

    from wanrt.engines.model import DiTConfig
    from wanrt.runtime.sizes import VideoGeometry

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    cfg = DiTConfig(in_dim=16, out_dim=16, **dict(DIMS[args.dims], num_layers=args.layers))
    geo = VideoGeometry(args.frames, args.height, args.width, (4, 8, 8))
    schemes = [s for s in args.schemes.split(",") if s]
    eval_seeds = [int(s) for s in args.eval_seeds.split(",") if s]
    work = ROOT / "bench" / "_work" / f"quality-{args.dims}-{args.layers}l"
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(CAVEAT)
    r: dict = {"dims": args.dims, "layers": args.layers, "tokens": geo.tokens, "threads": threads, "schemes": schemes,
               "eval_seeds": eval_seeds, "export_s": {}, "calibrate_s": {}, "graphs": {}}  # fmt: skip

    # 1. export: fp32 and the W8A16 graph of each scheme (the model is needed only here)
    model = diffusers_model(cfg, seed=0)
    r["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    view = official_view(model)
    graphs = {}
    for scheme in [None, *schemes]:
        name = scheme or "fp32"
        graphs[name], secs = export_graph(view, cfg, work / name, scheme, args.fresh)
        if secs is not None:
            r["export_s"][name] = secs
        say(f"{name} graph: {'exported in %.0f s' % secs if secs is not None else 'cached'}")
    del model, view
    gc.collect()

    # 2. W8A8: activation ranges on the calibration set, then Q/DQ
    calib = [feeds(CALIB_SEED, ts, geo.latent_shape(16), cfg) for ts in CALIB_TIMESTEPS]
    for scheme in schemes:
        graphs[f"{scheme} W8A8"], _, secs = calibrate_w8a8(graphs[scheme], scheme, calib, threads, args.fresh)
        graphs[f"{scheme} W8A16"] = graphs.pop(scheme)
        if secs is not None:
            r["calibrate_s"][scheme] = secs
        say(f"{scheme} W8A8 graph: {'calibrated in %.0f s' % secs if secs is not None else 'cached'}")

    # 3. every graph on the held-out sets (and the calibration set, for the in-sample gap)
    held_out = [feeds(s, EVAL_TIMESTEPS[i % len(EVAL_TIMESTEPS)], geo.latent_shape(16), cfg) for i, s in enumerate(eval_seeds)]
    sets = held_out + calib
    t0 = time.perf_counter()
    ref = run_with_blocks(graphs["fp32"], sets, threads)
    say(f"fp32 graph: {len(sets)} calls in {time.perf_counter() - t0:.0f} s")
    # int8 W8A8 also unfused: the Q/DQ math as written, apart from the error of ONNX Runtime's fused int8 kernel
    runs = [(g, g, "all") for g in graphs if g != "fp32"]
    runs += [(f"{s} W8A8 unfused", f"{s} W8A8", "disable") for s in schemes if s == "int8"]
    for name, graph_name, optimization in runs:
        t0 = time.perf_counter()
        out = run_with_blocks(graphs[graph_name], sets, threads, optimization)
        per_set = [[compare(o, rf) for o, rf in zip(outs, refs)] for outs, refs in zip(out, ref)]
        held, ins = per_set[: len(held_out)], per_set[len(held_out):]
        worst = lambda rows, i: {"cosine": min(s[i]["cosine"] for s in rows), "rel_l2": max(s[i]["rel_l2"] for s in rows)}  # noqa: E731
        r["graphs"][name] = {
            "held_out": [worst(held, i) for i in range(args.layers + 1)],  # blocks..., noise_pred
            "calibration_set_final": worst(ins, args.layers),
            "onnx_gb": sum(p.stat().st_size for p in (graphs[graph_name], graphs[graph_name].parent / "model.onnx.data")) / 1e9,
        }  # fmt: skip
        final = r["graphs"][name]["held_out"][-1]
        say(f"{name}: noise_pred cosine {final['cosine']:.6f}, rel L2 {final['rel_l2']:.2e} ({time.perf_counter() - t0:.0f} s)")
        del out
        gc.collect()
    r["fp32_onnx_gb"] = sum(p.stat().st_size for p in graphs["fp32"].parent.iterdir()) / 1e9
    r["peak_rss_gb"] = peak_rss_gb()

    block = markdown(r)
    print(block)
    say(json.dumps(r))
    if args.record:
        record(block, SECTION)


def cpu_flags() -> str:
    """The CPU's int8 dot-product features that change ONNX Runtime's int8 kernels (AVX-512 VNNI / AVX-VNNI / AMX)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ", ".join(have) or "none of avx2/avx512/vnni/amx"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def markdown(r: dict) -> str:
    """The RESULTS.md section for one run: per graph, worst cosine / relative L2 over the held-out sets, per block."""
    n = r["layers"]
    head = " | ".join(f"block {i}" for i in range(n))
    lines = [
        SECTION,
        "",
        f"Int8 / fp8 DiT graphs vs the fp32 graph at Wan2.1 T2V-1.3B widths (dim 1536, ffn 8960, 12 heads, text_dim 4096), "
        f"**{n} blocks** ({r['params_b']:.3f} B params, random weights), 5 frames 240x416 = {r['tokens']} tokens, batch 2; "
        f"ONNX Runtime CPU, {r['threads']} threads on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores; {cpu_flags()}), {datetime.date.today()}, code of commit {git_commit()}.",
        "",
        f"**{CAVEAT}**",
        "",
        "Activation scales (max) from one calibration set (seed 1, timesteps 999/750/500/250); evaluated on held-out "
        f"seeds {', '.join(map(str, r['eval_seeds']))} (other latents, contexts, timesteps). Each cell: the worst over "
        "the held-out sets of cosine / relative L2 of that block's output (the residual stream, errors accumulated "
        "from the blocks before) against the fp32 graph's. *int8 W8A8 unfused*: the same graph with ONNX Runtime's "
        "graph optimizations off, so its Q/DQ run as written in float32 (the quantization's own error) instead of the "
        "fused int8 MatMul (MatMulIntegerToFloat), whose u8 x s8 kernel saturates int16 pair sums on CPUs without "
        "VNNI (see the bench/step.py int8 / fp8 section).",
        "",
        f"| graph | {head} | noise_pred | noise_pred on the calibration set | ONNX GB |",
        "|---|" + "---|" * (n + 3),
    ]
    for name, g in r["graphs"].items():
        cells = [f"{c['cosine']:.6f} / {c['rel_l2']:.2e}" for c in g["held_out"]]
        ins = g["calibration_set_final"]
        lines.append(f"| {name} | {' | '.join(cells)} | {ins['cosine']:.6f} / {ins['rel_l2']:.2e} | {g['onnx_gb']:.2f} |")
    lines += [
        "",
        f"- fp32 graph {r['fp32_onnx_gb']:.2f} GB; peak RSS {r['peak_rss_gb']:.1f} GB"
        + (f"; export {', '.join(f'{k} {v:.0f} s' for k, v in r['export_s'].items())}" if r["export_s"] else "")
        + (f"; calibration {', '.join(f'{k} {v:.0f} s' for k, v in r['calibrate_s'].items())}" if r["calibrate_s"] else ""),
        f"- Command: `python bench/quant_quality.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
