"""Peak RSS and time of exporting a real-dimension umt5 text encoder to ONNX.

A checkpoint in the official layout (`models_t5_umt5-xxl-enc-bf16.pth` keys, bf16) is written with
the real widths (vocab 256384 x dim 4096 embedding, dim_attn 4096, ffn 10240, 64 heads) and a
few layers.  Each measurement runs in a fresh child process (peak RSS = its `ru_maxrss`):

- `streamed`: `export_text_encoder_onnx(path, ...)`: traced on meta, weights read one at a time;
- `baseline`: `load_t5_encoder(path, dtype)` (the whole model in memory), then export that module.

Peak RSS includes the file-backed pages of the mmap'd `.pth` (clean, reclaimable); a sampler
thread also reports the peak anonymous and file-backed parts separately.

    .venv/bin/python bench/export_t5.py [--layers 2] [--precision bf16 --precision fp32] [--json]
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

WORK = ROOT / "bench" / "_work" / "export_t5"


def write_checkpoint(path: Path, layers: int) -> dict:
    """An official-layout bf16 T5 file with real widths and `layers` blocks (small random values)."""
    import torch

    from wanrt.export.models.t5 import T5Config, t5_state_shapes

    cfg = T5Config(num_layers=layers)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in t5_state_shapes(cfg).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return {"params": sum(t.numel() for t in state.values())}


class PeakMemory:
    """Samples /proc/self/status while running: peak anonymous and file-backed (mmap) resident memory."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in self.peak:
                self.peak[name] = max(self.peak[name], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def child(mode: str, precision: str, ckpt: Path, out: Path) -> dict:
    """One measured export, run in this (fresh) process."""
    from wanrt.export.onnx.encoders import DTYPES, export_text_encoder_onnx
    from wanrt.export.models.t5 import load_t5_encoder

    with PeakMemory() as mem:
        start = time.perf_counter()
        source = ckpt if mode == "streamed" else load_t5_encoder(ckpt, DTYPES[precision])
        files = export_text_encoder_onnx(source, out, precision, progress=False).files
        seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "precision": precision,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_anon_gb": round(mem.peak["RssAnon"] / 2**30, 2),
        "peak_file_gb": round(mem.peak["RssFile"] / 2**30, 2),
        "onnx_data_gb": round(files[1].stat().st_size / 2**30, 2),
    }


@click.command()
@click.option("--layers", default=2, show_default=True, help="T5 blocks (the real model has 24)")
@click.option("--precision", "precisions", multiple=True, default=("bf16", "fp32"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--child-run", nargs=2, hidden=True, default=None)
def main(layers: int, precisions: tuple[str, ...], as_json: bool, child_run: tuple[str, str] | None) -> None:
    ckpt = WORK / f"t5_{layers}layers.pth"
    if child_run:
        mode, precision = child_run
        print(json.dumps(child(mode, precision, ckpt, WORK / f"out_{mode}_{precision}")))
        return
    info = {"layers": layers, "checkpoint": str(ckpt.relative_to(ROOT))}
    if not ckpt.is_file():
        print(f"writing {ckpt} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import cli; "
                        f"from bench.export_t5 import write_checkpoint; from pathlib import Path; "
                        f"write_checkpoint(Path({str(ckpt)!r}), {layers})"], check=True)  # fmt: skip
    from wanrt.export.models.t5 import T5Config, t5_state_shapes

    info["params"] = sum(math.prod(s) for s in t5_state_shapes(T5Config(num_layers=layers)).values())
    info["checkpoint_gb"] = round(ckpt.stat().st_size / 2**30, 2)
    runs = []
    for precision in precisions:
        for mode in ("streamed", "baseline"):
            print(f"export {mode} {precision} ...", file=sys.stderr)
            done = subprocess.run([sys.executable, __file__, "--layers", str(layers), "--child-run", mode, precision],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            runs[-1]["weights_gb"] = round(info["params"] * (2 if precision != "fp32" else 4) / 2**30, 2)
    info["runs"] = runs
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"T5 real widths, {layers} layers, {info['params'] / 1e9:.3f} B params, checkpoint {info['checkpoint_gb']} GB (bf16)")
    print("| precision | mode | weights GB | peak RSS GB | of it anon / file-backed (sampled) | seconds | model.onnx.data GB |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['precision']} | {r['mode']} | {r['weights_gb']} | {r['peak_rss_gb']} | "
              f"{r['peak_anon_gb']} / {r['peak_file_gb']} | {r['seconds']} | {r['onnx_data_gb']} |")


if __name__ == "__main__":
    main()
