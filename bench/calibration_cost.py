"""Cost of calibrating a Wan2.1 T2V-1.3B-dimension DiT expert: time and peak RSS of `calibrate_bundle`.

What runs is the build's own calibration (`calibration.calibrate.calibrate_bundle`: our text
encoder, our UniPC sampler with CFG, the DiT's range-collecting graph in ONNX Runtime) on a bundle
staged as `build-engine --quantize SCHEME --weights-only` writes it, from a random checkpoint in
the official layout (`make-tiny-model --dims 1.3B:LAYERS`: dim 1536, ffn 8960, 12 heads, text_dim
4096, LAYERS blocks, default all 30).

The text encoder: the DiT's text_dim is 4096, so the bundle needs a umt5 of d_model 4096; the real
umt5-xxl (24 layers, 5.7 B params, 11 GB at bf16) does not fit beside a 1.3B DiT session on the
machines this runs on, and its weights cannot be downloaded.  `make-tiny-model --dims` writes a
real-width but cheap one: d_model 4096, 64 heads, 1 layer, d_ff 512, and the project's small
umt5-style tokenizer (the real 256k-piece vocabulary is not available).  Its output has the real
shape [1, 512, 4096] (contexts are padded to text_len 512 either way), so the DiT's cost is the
real one; the encoder's cost is reported apart and is NOT the real umt5-xxl's.

The calibration runs in a child process (its own peak RSS, `resource.getrusage(RUSAGE_SELF)`),
on `--prompts` of the built-in prompts x `--steps` sampling steps at `--size` (default: the
calibration default, the bundle's 832x480 at 5 frames = 3120 tokens); the DiT's per-call time is
then extrapolated to the default calibration (all 32 built-in prompts x the bundle's 50 steps).
The bundle's DiT graph is restored after the run, so it is reused by later runs.

    python bench/calibration_cost.py [--layers 30] [--scheme int8] [--method max|percentile]
                                     [--prompts 1] [--steps 2] [--size 832x480x5] [--record]

Work files in bench/_work/calib-1.3B-<layers>l/ (the checkpoint and bundle are reused; --fresh rebuilds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

SECTION = "## bench/calibration_cost.py"
DEFAULT_STEPS = 50  # Wan2.1 T2V's sampling steps (engines.defaults), what a default calibration runs


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_cli(args: list[str], say) -> float:
    """Run `python cli.py ARGS` (the checkout's CLI); its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    say(f"cli.py {args[0]}: {seconds:.0f} s")
    return seconds


def child(bundle: Path, scheme: str, method: str, prompts_file: Path, steps: int, size: str) -> dict:
    """Calibrate `bundle`'s DiT (its graph restored afterwards); the timings and this process's peak RSS."""
    from wanrt.calibration.calibrate import CalibrationOptions, calibrate_bundle, parse_size
    from wanrt.engines.manifest import read_manifest

    rss_start = peak_rss_gb()
    manifest = read_manifest(bundle)
    graph = bundle / manifest.components["dit"].onnx
    saved = graph.read_bytes()  # graph only (the weights live in the data file, untouched)
    options = CalibrationOptions(method=method, prompts_file=str(prompts_file), steps=steps, size=parse_size(size))
    try:
        result = calibrate_bundle(bundle, manifest, ["dit"], scheme, options, log=lambda m: print(m, file=sys.stderr))
    finally:
        graph.write_bytes(saved)
    steps_rec = [s for run in result.runs for s in run.steps]
    return {
        "seconds": result.seconds, "prompts": result.prompts, "calls": result.records["dit"]["calls"],
        "linears": len(result.records["dit"]["scales"]),
        "text_encoder_s": [run.stages.get("text_encoder", 0.0) for run in result.runs],
        "denoise_s": [run.stages.get("denoise", 0.0) for run in result.runs],
        "dit_engine_s": sum(s.engine_seconds for s in steps_rec),
        "dit_load_s": sum(s.load_seconds for s in steps_rec),
        "dit_step_engine_s": [[s.engine_seconds for s in run.steps] for run in result.runs],  # per prompt, per step
        "dit_calls_per_step": steps_rec[0].engine_calls if steps_rec else None,
        "rss_start_gb": rss_start, "peak_rss_gb": peak_rss_gb(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="DiT blocks (1.3B widths); 30 is the real expert")
    ap.add_argument("--scheme", choices=("int8", "fp8"), default="int8")
    ap.add_argument("--method", choices=("max", "percentile"), default="max")
    ap.add_argument("--prompts", type=int, default=1, help="the first N built-in calibration prompts")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per prompt (--calib-steps)")
    ap.add_argument("--size", default="832x480x5", help="calibration size WIDTHxHEIGHTxFRAMES (--calib-size)")
    ap.add_argument("--fresh", action="store_true", help="rewrite the checkpoint and rebuild the bundle")
    ap.add_argument("--record", action="store_true", help="write the result into bench/RESULTS.md")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: calibrate this bundle, print JSON
    ap.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: where the child writes its JSON
    args = ap.parse_args()
    if args.child:
        args.result.write_text(json.dumps(child(args.child, args.scheme, args.method, args.prompts_file, args.steps, args.size)))
        return

    from wanrt.calibration.prompts import read_prompts
    from wanrt.runtime.sizes import VideoGeometry

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    work = ROOT / "bench" / "_work" / f"calib-1.3B-{args.layers}l"
    model, bundle = work / "model", work / f"bundle-{args.scheme}-w8a16"
    r: dict = {"layers": args.layers, "scheme": args.scheme, "method": args.method, "prompts": args.prompts,
               "steps": args.steps, "size": args.size}  # fmt: skip
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    if not (model / "config.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        r["make_model_s"] = timed_cli(["make-tiny-model", str(model), "--family", "wan2.1", "--task", "t2v",
                                       "--dims", f"1.3B:{args.layers}"], say)  # fmt: skip
    if not (bundle / "manifest.json").is_file():
        r["build_s"] = timed_cli(["build-engine", str(model), "-o", str(bundle), "--quantize", args.scheme, "--weights-only"], say)
    r["dit_onnx_gb"] = sum(p.stat().st_size for p in (bundle / "dit").iterdir()) / 1e9
    r["text_encoder_onnx_gb"] = sum(p.stat().st_size for p in (bundle / "text_encoder").iterdir()) / 1e9

    builtin = read_prompts(None).prompts
    r["default_prompts"] = len(builtin)
    prompts_file = work / f"prompts-{args.prompts}.txt"
    prompts_file.write_text("\n".join(builtin[: args.prompts]) + "\n")
    width, height, frames = (int(v) for v in args.size.lower().split("x"))
    r["tokens"] = VideoGeometry(frames, height, width, (4, 8, 8)).tokens
    say(f"calibrating {args.layers} blocks: {args.prompts} prompt(s) x {args.steps} steps at {args.size} ({r['tokens']} tokens)")
    start = time.perf_counter()
    result = work / f"result-{args.method}-{args.prompts}x{args.steps}.json"  # kept: the raw numbers of the last run
    result.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--child", str(bundle), "--scheme", args.scheme, "--method", args.method,
                    "--prompts-file", str(prompts_file), "--steps", str(args.steps), "--size", args.size,
                    "--result", str(result)], check=True, cwd=ROOT)  # fmt: skip
    r["child_wall_s"] = time.perf_counter() - start
    r.update(json.loads(result.read_text()))
    r["load"] = os.getloadavg()

    extrapolate(r)
    block = markdown(r)
    print(block)
    say(json.dumps(r))
    if args.record:
        sys.path.insert(0, str(ROOT / "bench"))
        from step import record

        record(block, SECTION)


def extrapolate(r: dict) -> None:
    """Add the steady per-call time and the cost of the default calibration (all built-in prompts x 50 steps) to `r`.

    Each prompt loads the DiT session and runs its steps; its first call also pays ONNX Runtime's
    first-run allocations, so the steady per-call time comes from the later calls where there are any."""
    first = [run[0] for run in r["dit_step_engine_s"] if run]
    later = [t for run in r["dit_step_engine_s"] for t in run[1:]]
    r["dit_first_call_s"] = sum(first) / len(first)
    r["dit_call_s"] = sum(later) / len(later) if later else r["dit_first_call_s"]
    calls_per_step = r["calls"] / (r["prompts"] * r["steps"])
    per_prompt = r["dit_load_s"] / r["prompts"] + r["dit_first_call_s"] + (DEFAULT_STEPS * calls_per_step - 1) * r["dit_call_s"]
    r["full"] = {
        "calls": r["default_prompts"] * DEFAULT_STEPS * calls_per_step,
        "dit_s": r["default_prompts"] * per_prompt,
        "text_encoder_s": r["default_prompts"] * sum(r["text_encoder_s"]) / r["prompts"],
    }


def markdown(r: dict) -> str:
    """The RESULTS.md section for one run."""
    f = r["full"]
    enc = sum(r["text_encoder_s"]) / r["prompts"]
    lines = [
        SECTION,
        "",
        f"`calibrate_bundle` ({r['scheme']} W8A8, method {r['method']}) on a Wan2.1 T2V-1.3B-dimension expert, "
        f"**{r['layers']} of 30 blocks** (random weights, official layout, `build-engine --quantize {r['scheme']} --weights-only` "
        f"bundle: DiT {r['dit_onnx_gb']:.2f} GB), {r['prompts']} built-in prompt(s) x {r['steps']} steps with CFG at "
        f"{r['size']} ({r['tokens']} tokens); {os.cpu_count()} cores of {platform.processor() or platform.machine()}, "
        f"{datetime.date.today()}, load average {r['load'][0]:.1f} at the end.",
        "",
        "| what | value |",
        "|---|---|",
        f"| DiT calls (batch {2 if r['dit_calls_per_step'] == 1 else 1}: cond + uncond) | {r['calls']} "
        f"({r['dit_calls_per_step']} per step), {r['linears']} quantized linears calibrated |",
        f"| DiT seconds per call (range-collecting graph, engine time; {'later calls' if r['steps'] > 1 else 'first call only'}) "
        f"| {r['dit_call_s']:.2f} ({1 / r['dit_call_s']:.3f} calls/s); first call of a session {r['dit_first_call_s']:.2f} |",
        f"| DiT session loads | {r['dit_load_s']:.1f} s over {r['prompts']} prompt(s) |",
        f"| text encoder per prompt (load + cond + negative; cheap d_model-4096 1-layer umt5, **not** umt5-xxl) | {enc:.2f} s |",
        f"| calibrate_bundle total | {r['seconds']:.1f} s |",
        f"| peak RSS of the calibrating process | {r['peak_rss_gb']:.2f} GB (at start {r['rss_start_gb']:.2f} GB) |",
        f"| extrapolated: {r['default_prompts']} prompts x {DEFAULT_STEPS} steps (the default; per prompt a session load, "
        f"a first call, then later calls) | {f['calls']:.0f} DiT calls, "
        f"{f['dit_s'] / 3600:.1f} h DiT + {f['text_encoder_s'] / 60:.1f} min (cheap) text encoder |",
        f"| command | `python bench/calibration_cost.py {' '.join(sys.argv[1:])}` |",
    ]
    if r["layers"] < 30:  # the blocks are nearly all of a call: scale the per-call time by 30 / layers
        per_call = r["dit_call_s"] * 30 / r["layers"]
        lines.append(f"| estimated at all 30 blocks (per-call time x 30 / {r['layers']}) | {per_call:.0f} s per call, "
                     f"{f['calls'] * per_call / 3600:.0f} h for the default calibration |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
