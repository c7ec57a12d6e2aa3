"""The traced-graph cache (`export/onnx/graph_cache.py`): `build-engine` with the cache off, storing, and hitting it.

Two random checkpoints of one architecture (`make-tiny-model --seed 1` and `--seed 2`, default a
tiny Wan2.1 I2V: DiT, umt5, CLIP, VAE) are built with `python cli.py build-engine`, each in a
fresh process, per round:

- baseline: seed 2 with `WANRT_GRAPH_CACHE=0` (every component traced by torch.onnx);
- store: seed 1 into an empty cache (traced, then stored);
- cached: seed 2 from that cache (seed 2's own weights attached to seed 1's stored trace).

Every build has its own empty `WANRT_CACHE_DIR`, so no other cache answers.  After each round the
cached bundle's component files (graphs and weight files) are compared byte for byte with the
baseline's: the cache is only worth having if what it gives is what a fresh trace gives.

    python bench/graph_cache.py [--family wan2.1] [--task i2v] [--dims 1.3B:2] [--rounds 2] [--record]

Work files in bench/_work/graph-cache/ (removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## bench/graph_cache.py"


def cli(args: list[str], env: dict[str, str]) -> float:
    """Run `python cli.py ARGS` (this checkout's CLI) in a fresh process; its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def build(model: Path, out: Path, work: Path, graphs: str) -> float:
    """`build-engine MODEL -o OUT` with an empty build cache of its own and WANRT_GRAPH_CACHE=`graphs`."""
    cache = work / f"cache-{out.name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, WANRT_CACHE_DIR=str(cache), WANRT_GRAPH_CACHE=graphs)
    return cli(["build-engine", str(model), "-o", str(out)], env)


def component_files(bundle: Path) -> dict[str, bytes]:
    """Every file of the bundle's components (graphs, weight files), by relative path; the manifest is left out."""
    return {str(p.relative_to(bundle)): p.read_bytes() for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="wan2.1")
    ap.add_argument("--task", default="i2v")
    ap.add_argument("--dims", default=None, help="make-tiny-model --dims (real widths), default the tiny model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="write the result into bench/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep bench/_work/graph-cache")
    args = ap.parse_args()

    work = ROOT / "bench" / "_work" / "graph-cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, WANRT_CACHE_DIR=str(work / "cache-models"))
    models = {}
    for seed in (1, 2):
        models[seed] = work / f"model-{seed}"
        dims = ["--dims", args.dims] if args.dims else []
        cli(["make-tiny-model", str(models[seed]), "--family", args.family, "--task", args.task, "--seed", str(seed), *dims], env)
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {"baseline": [], "store": [], "cached": []}
    identical, files = [], 0
    for r in range(args.rounds):
        graphs = work / f"graphs-{r}"
        shutil.rmtree(graphs, ignore_errors=True)
        bundles = {k: work / f"{k}-{r}" for k in times}
        times["baseline"].append(build(models[2], bundles["baseline"], work, "0"))
        times["store"].append(build(models[1], bundles["store"], work, str(graphs)))
        times["cached"].append(build(models[2], bundles["cached"], work, str(graphs)))
        fresh, cached = component_files(bundles["baseline"]), component_files(bundles["cached"])
        files = len(fresh)
        identical.append(fresh == cached)
        if not identical[-1]:
            differ = sorted(k for k in fresh.keys() | cached.keys() if fresh.get(k) != cached.get(k))
            print(f"round {r}: cached bundle differs from the fresh one in {differ}", file=sys.stderr)
        print(json.dumps({k: round(v[-1], 1) for k, v in times.items()} | {"identical": identical[-1]}), file=sys.stderr)
        for b in bundles.values():
            shutil.rmtree(b)
    entries = sum(1 for _ in (work / "graphs-0").iterdir()) if (work / "graphs-0").exists() else 0
    stored_mb = sum(p.stat().st_blocks * 512 for p in (work / "graphs-0").rglob("*") if p.is_file()) / 2**20
    r = {"times": times, "identical": identical, "files": files, "entries": entries, "stored_mb": stored_mb,
         "load": (load_start, os.getloadavg())}  # fmt: skip
    block = markdown(args, r)
    print(block)
    if args.record:
        sys.path.insert(0, str(ROOT / "bench"))
        from step import record

        record(block, SECTION)
    if not args.keep:
        shutil.rmtree(work)
    if not all(identical):
        sys.exit("the cached build differs from the fresh one")


def markdown(args, r: dict) -> str:
    """The RESULTS.md section for one run."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    model = f"{args.family} {args.task} " + (f"`--dims {args.dims}`" if args.dims else "tiny model")
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    dims = f" --dims {args.dims}" if args.dims else ""
    lines = [
        SECTION,
        "",
        f"Command: `python bench/graph_cache.py --family {args.family} --task {args.task}{dims} --rounds {args.rounds}"
        f"{' --record' if args.record else ''}`  ",
        f"Machine: {os.cpu_count()} cores of {platform.processor() or platform.machine()}, Python {platform.python_version()}  ",
        f"Date: {datetime.date.today()}, code of commit {commit}; load average {r['load'][0][0]:.1f} at the start,"
        f" {r['load'][1][0]:.1f} at the end (a shared machine)",
        "",
        f"`build-engine` of a random {model} (every component), a fresh process per build, each with its own empty"
        f" build cache; seconds per round, median last.",
        "",
        "| build | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median s |",
        "|---|" + "---|" * (args.rounds + 1),
    ]
    names = {"baseline": "baseline: seed 2, `WANRT_GRAPH_CACHE=0` (traced)",
             "store": "seed 1 into an empty cache (traced, stored)",
             "cached": "seed 2 from the cache (seed 1's trace, seed 2's weights)"}  # fmt: skip
    for k, label in names.items():
        lines.append(f"| {label} | " + " | ".join(f"{t:.1f}" for t in r["times"][k]) + f" | {med[k]:.1f} |")
    same = "byte-identical" if all(r["identical"]) else "NOT identical"
    lines += [
        "",
        "Reading:",
        "",
        f"- from the cache: {med['cached']:.1f} s against {med['baseline']:.1f} s traced"
        f" ({med['baseline'] / med['cached']:.1f}x faster); storing costs {med['store'] - med['baseline']:+.1f} s"
        " against the baseline (seed 1's weights, the same architecture).",
        f"- the cached bundle's {r['files']} component files are {same} to the baseline's in every round.",
        f"- the cache holds {r['entries']} entries ({r['stored_mb']:.1f} MB allocated on disk: the weights' ranges are"
        " holes in a sparse file).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
