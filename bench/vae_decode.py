"""Peak memory and time of decoding latents with the real-dimension Wan2.1 VAE on the CPU: chunked vs whole-clip.

The VAE has the released widths (dim 96, z 16, 126.9 M params) and random weights.  For each
number of latent frames F (4F-3 video frames), each method runs in a fresh child process; the
working memory is the peak RSS (`ru_maxrss`) minus the RSS once the model and the latents are
loaded, so it is what the decode itself needs:

- `whole-clip torch`: one decoder call over all F latent frames (the memory a single engine
  with a frames dim would need; the official code never does this, its numbers differ at frame 0);
- `chunked torch`: `WanVAE.decode`, one latent frame per call with the caches handed on;
- `chunked engine`: `runtime.vae.decode_latents` driving the exported `vae_decoder` ONNX
  engine through ONNX Runtime (the product path: one latent frame per engine call).

    .venv/bin/python bench/vae_decode.py [--size 128] [--frames 2,5,9] [--json]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import cli  # noqa: F401,E402  (binds the package name `wanrt` to this checkout)

WORK = ROOT / "bench" / "_work" / "vae_decode"
METHODS = ("whole-clip torch", "chunked torch", "chunked engine")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def real_vae():
    """The released Wan2.1 VAE architecture with seeded random weights."""
    import torch

    from wanrt.export.models.vae import VAEConfig, WanVAE

    torch.manual_seed(0)
    return WanVAE(VAEConfig.official("2.1")).eval().requires_grad_(False)


def export_engine(out: Path) -> None:
    """Export the real-dimension decoder engine (once; reused by later runs)."""
    from wanrt.export.onnx.vae import export_vae_onnx

    written = export_vae_onnx(real_vae(), out / "vae_decoder", "fp32", part="decoder")
    (out / "component.json").write_text(json.dumps(written.manifest_entry("vae_decoder", "vae_decoder", "fp32", out).to_dict()))


def child(method: str, frames: int, size: int) -> dict:
    """One measured decode in this (fresh) process."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    latent = size // 8
    z = np.random.default_rng(0).standard_normal((1, 16, frames, latent, latent), dtype=np.float32)
    if method == "chunked engine":
        from wanrt.engines.manifest import Component
        from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions
        from wanrt.runtime.vae import decode_latents

        comp = Component.from_dict("vae_decoder", json.loads((WORK / "engine" / "component.json").read_text()))
        engine = OnnxRuntimeBackend(OrtOptions(device="cpu", intra_op_threads=1)).load(comp, WORK / "engine")
        run = lambda: decode_latents(engine, comp, z)  # noqa: E731
    else:
        vae = real_vae()
        zt = torch.from_numpy(z)
        if method == "chunked torch":
            run = lambda: vae.decode(zt)  # noqa: E731
        else:
            run = lambda: vae.decode_chunk(zt, torch.tensor([False]))[0]  # noqa: E731
    before = _rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "latent_frames": frames,
        "video_frames": int(out.shape[2]),
        "rss_before_gb": round(before / 2**30, 3),
        "peak_rss_gb": round(peak / 2**30, 3),
        "working_gb": round((peak - before) / 2**30, 3),
        "output_gb": round(np.prod(out.shape) * 4 / 2**30, 3),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
    }


@click.command()
@click.option("--size", default=128, show_default=True, help="video height and width in pixels (multiple of 8)")
@click.option("--frames", default="2,5,9", show_default=True, help="latent frame counts (4F-3 video frames)")
@click.option("--method", "methods", multiple=True, default=METHODS, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--child-run", nargs=2, hidden=True, default=None)
def main(size: int, frames: str, methods: tuple[str, ...], as_json: bool, child_run: tuple[str, str] | None) -> None:
    if child_run:
        print(json.dumps(child(child_run[0], int(child_run[1]), size)))
        return
    if "chunked engine" in methods and not (WORK / "engine" / "component.json").is_file():
        print("exporting the real-dimension vae_decoder engine ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import cli; "
                        f"from bench.vae_decode import export_engine; from pathlib import Path; "
                        f"export_engine(Path({str(WORK / 'engine')!r}))"], check=True)  # fmt: skip
    runs = []
    for f in (int(x) for x in frames.split(",")):
        for method in methods:
            print(f"{method}, {f} latent frames ...", file=sys.stderr)
            done = subprocess.run([sys.executable, __file__, "--size", str(size), "--child-run", method, str(f)],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if as_json:
        print(json.dumps({"size": size, "runs": runs}, indent=2))
        return
    print(f"Wan2.1 VAE decoder, real widths, {size}x{size} px, fp32, 1 thread")
    print("| latent frames | video frames | method | working memory GB | peak RSS GB | output GB | seconds | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['latent_frames']} | {r['video_frames']} | {r['method']} | {r['working_gb']} | {r['peak_rss_gb']} | "
              f"{r['output_gb']} | {r['seconds']} | {r['cpu_seconds']} |")


if __name__ == "__main__":
    main()
