"""`cli.py run BUNDLE --prompt ... -o OUT.mp4`: generate a video from a bundle without torch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from wanrt.engines.limits import CONTEXT_SCALE_RANGE, MEMORY_BUDGET_GIB, SAMPLING_RANGES, SEED_RANGE
from wanrt.engines.manifest import verify_bundle
from wanrt.engines.options import InRange

from .backends import BACKENDS, choose_backend, make_backend
from .animate import pipeline_class
from .pipeline import GenerationRequest
from .progress import Progress
from .schedulers import SAMPLERS
from .video import check_frames_dir, check_output_path, to_uint8_frames, write_mp4, write_png_frames


@click.command("run")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="What the video shows.")
@click.option("--negative-prompt", default=None, help="What to avoid (default: the official negative prompt).")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="First frame (i2v, flf2v; optional for ti2v).")
@click.option("--last-image", type=click.Path(dir_okay=False), default=None, help="Last frame (flf2v).")
@click.option("--video", type=click.Path(), default=None,
              help="VACE: control video (mp4 or a folder of frames: depth, pose, scribble, gray, or the video to edit); gives the size.")
@click.option("--mask", type=click.Path(), default=None,
              help="VACE: mask video over --video (file or frames folder, same size): white regenerates, black keeps.")
@click.option("--ref-image", "ref_images", type=click.Path(dir_okay=False), multiple=True,
              help="VACE: reference image (repeatable), prepended as a latent frame and dropped from the output.")
@click.option("--context-scale", type=InRange(CONTEXT_SCALE_RANGE), default=None,
              help="VACE: weight of the control hints (default 1.0, the official vace_context_scale).")
@click.option("--frames", type=int, default=None, help="Frame count, 4k+1 (default: the bundle's; VACE: at most the --video's).")
@click.option("--height", type=int, default=None, help="Height in pixels; with an image, height*width is the max area.")
@click.option("--width", type=int, default=None, help="Width in pixels.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the bundle's).")
@click.option("--guidance", type=InRange(SAMPLING_RANGES["guide_scale"]), default=None, help="CFG scale for every expert (default: the bundle's).")
@click.option("--shift", type=InRange(SAMPLING_RANGES["shift"]), default=None, help="Flow-matching schedule shift (default: the bundle's).")
@click.option(
    "--sampler", type=click.Choice(SAMPLERS), default=None,
    help="unipc (Wan's default), euler, or distill (LightX2V's step-distilled schedule; needs a distill bundle). Default: the bundle's.",
)
@click.option("--seed", type=InRange(SEED_RANGE), default=None, help="Noise seed (default: random, reported); numpy's generator, so not the official (torch) noise.")
@click.option(
    "--vae-tiling", is_flag=True,
    help="Encode/decode in overlapping 256-pixel tiles every 192 pixels (as diffusers): bounded VAE memory at large sizes.",
)
@click.option(
    "--vram-budget", "--memory-budget", "vram_budget", type=InRange(MEMORY_BUDGET_GIB), default=None,
    metavar="GIB",
    help="GiB of device memory the run may use (weights, activations, I/O buffers; TensorRT keeps 1 GiB of it"
    " free as a margin). Default: all free GPU memory on TensorRT, 90% of free memory on ONNX Runtime."
    " Both Wan2.2 experts stay loaded when they fit; else one at a time; else (TensorRT) weights are streamed;"
    " else the run is refused naming the smallest budget that works. --memory-budget is the same option.",
)
@click.option(
    "--rehash", is_flag=True,
    help="Re-read every bundle file for its sha256 check (default: files already hashed in their current state are not re-read).",
)
@click.option(
    "--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
    help="auto: TensorRT when every component has a plan for this GPU and a TensorRT runtime imports, else ONNX Runtime.",
)
@click.option("--device", "device_index", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device index.")
@click.option(
    "--cuda-graphs", is_flag=True,
    help="TensorRT: capture each engine's execution into a CUDA graph after its first call and replay it.",
)
@click.option("--pose-video", type=click.Path(dir_okay=False), default=None, help="Animate: the pose skeleton video (sets size and length).")
@click.option("--face-video", type=click.Path(dir_okay=False), default=None, help="Animate: the face crops video (as many frames as the pose video).")
@click.option("--mode", type=click.Choice(["animate", "replace"]), default=None, help="Animate: animate the --image (default) or replace the person.")
@click.option("--background-video", type=click.Path(dir_okay=False), default=None, help="Animate --mode replace: the background video.")
@click.option("--mask-video", type=click.Path(dir_okay=False), default=None, help="Animate --mode replace: the person mask video.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .mp4 (H.264).")
@click.option("--frames-dir", type=click.Path(file_okay=False), default=None, help="Also write PNG frames here.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def run_command(
    bundle: str, prompt: str, negative_prompt: str | None, image: str | None, last_image: str | None,
    video: str | None, mask: str | None, ref_images: tuple[str, ...], context_scale: float | None, frames: int | None, height: int | None, width: int | None, steps: int | None, guidance: float | None,
    shift: float | None, sampler: str | None, seed: int | None, vae_tiling: bool, vram_budget: float | None, rehash: bool,
    backend: str, device_index: int, cuda_graphs: bool, pose_video: str | None, face_video: str | None, mode: str | None,
    background_video: str | None, mask_video: str | None, output: str, frames_dir: str | None, as_json: bool,
) -> None:
    """Generate a video from a bundle (torch-free runtime)."""
    start = time.perf_counter()
    out = check_output_path(output)
    if frames_dir is not None:
        check_frames_dir(frames_dir)  # before any work: a bad folder must not cost a whole generation
    manifest = verify_bundle(bundle, remembered=not rehash)
    verify_seconds = time.perf_counter() - start
    choice = choose_backend(backend, manifest, device_index)
    if cuda_graphs and choice.name != "tensorrt":
        click.echo(f"warning: --cuda-graphs has no effect on {choice.name} ({choice.reason})", err=True)
    engine_backend = make_backend(choice.name, device_index=device_index, cuda_graphs=cuda_graphs)
    budget = int(vram_budget * 2**30) if vram_budget is not None else None
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, image=image, last_image=last_image, frames=frames,
        height=height, width=width, steps=steps, guidance=guidance, shift=shift, seed=seed,
        sampler=sampler, vae_tiling=vae_tiling, video=video, mask=mask, ref_images=list(ref_images) or None,
        context_scale=context_scale, pose_video=pose_video, face_video=face_video, mode=mode,
        background_video=background_video, mask_video=mask_video,
    )
    try:
        pipeline = pipeline_class(manifest.task)(bundle, manifest, engine_backend, memory_budget_bytes=budget, progress=Progress(enabled=True))
        plan = pipeline.prepare(request)
        result = pipeline.generate(plan)
        write_start = time.perf_counter()
        video = to_uint8_frames(result.video)
        write_mp4(video, out, plan.fps)
        written_frames = None
        if frames_dir is not None:
            try:
                written_frames = write_png_frames(video, frames_dir)
            except BaseException:
                out.unlink(missing_ok=True)
                raise
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (engines.interrupts.Terminated)
        # every engine was released on the way out (context managers); nothing was renamed into place
        click.echo(f"{getattr(e, 'message', 'interrupted')}: device memory released, no output written", err=True)
        raise SystemExit(getattr(e, "exit_code", 130)) from None
    finally:
        engine_backend.close()
    result.stats.stages["write"] = time.perf_counter() - write_start
    for warning in result.stats.warnings:
        click.echo(f"warning: {warning}", err=True)
    summary = {
        "output": str(out),
        "frames_dir": str(Path(frames_dir)) if written_frames is not None else None,
        "bundle": str(bundle),
        "verify_seconds": verify_seconds,
        "backend_choice": choice.to_dict(),
        "total_seconds": time.perf_counter() - start,
        **plan.summary(),
        **result.stats.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        g = plan.geometry
        experts = sorted(set(summary["experts"]), key=summary["experts"].index)
        click.echo(
            f"{out}: {summary.get('output_frames', g.frames)} frames {g.width}x{g.height} at {plan.fps} fps, {len(plan.steps)} steps"
            f" ({', '.join(experts)}), seed {plan.seed}, {summary['total_seconds']:.1f} s"
            f" on {result.stats.backend}"
        )

