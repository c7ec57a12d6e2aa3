"""`plugin-build`: compile the attention kernels ahead of time into a plugin folder (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wanrt.engines.errors import WanrtError
from wanrt.engines.schema import load_json

from .aot import PLUGIN_JSON, FORMAT, arch_name, build_plugin, default_archs, parse_archs
from .kernels import HEAD_DIMS, PRECISIONS

IO_DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def _choices(text: str, allowed: tuple, what: str, cast=str) -> tuple:
    """A comma-separated option value ("all" = every allowed value), checked against `allowed`."""
    if text == "all":
        return tuple(allowed)
    try:
        values = tuple(dict.fromkeys(cast(part.strip()) for part in text.split(",") if part.strip()))
    except ValueError:
        values = ()
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise WanrtError(f"{what} {text!r}: expected a comma-separated list of {', '.join(map(str, allowed))}, or all")
    return values


def _check_output(output: Path, force: bool) -> None:
    """Refuse to replace a folder that is not a plugin folder (or not empty) unless --force."""
    if not output.exists():
        return
    if not output.is_dir():
        raise WanrtError(f"{output}: exists and is not a folder")
    if force or not any(output.iterdir()):
        return
    try:
        description = load_json((output / PLUGIN_JSON).read_bytes(), str(output / PLUGIN_JSON))
        is_plugin = isinstance(description, dict) and description.get("format") == FORMAT
    except (OSError, WanrtError):
        is_plugin = False
    if not is_plugin:
        raise WanrtError(f"{output}: exists and is not a plugin folder; choose another -o or pass --force")


@click.command("plugin-build")
@click.option("--gpu-arch", "gpu_arch", default=None,
              help="Architectures to compile for, e.g. sm_80,sm_90 (default: this machine's GPU, else sm_80,sm_86,sm_89,sm_90).")
@click.option("--precision", default="bf16", show_default=True,
              help=f"QK^T precision(s): {', '.join(PRECISIONS)} (comma-separated) or all.")
@click.option("--io-dtype", "io_dtype", default="bf16", show_default=True,
              help="Input/output dtype(s) of the attention node: bf16, fp16, fp32 (comma-separated) or all.")
@click.option("--head-dim", "head_dim", default="128", show_default=True, help="Head size(s): 64, 128 (comma-separated) or all.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Plugin folder to write (replaced whole).")
@click.option("--force", is_flag=True, help="Replace OUTPUT even if it is not a plugin folder.")
@click.option("--json", "as_json", is_flag=True, help="Print plugin.json's content instead of a summary.")
def plugin_build_command(gpu_arch, precision, io_dtype, head_dim, output, force, as_json):
    """Compile the attention kernels (cubin + PTX per architecture) and write plugin.json."""
    archs = parse_archs(gpu_arch) if gpu_arch else default_archs()
    precisions = _choices(precision, PRECISIONS, "--precision")
    dtypes = _choices(io_dtype, IO_DTYPE_CHOICES, "--io-dtype")
    head_dims = _choices(head_dim, HEAD_DIMS, "--head-dim", cast=int)
    _check_output(output, force)
    description = build_plugin(output, archs, precisions, dtypes, head_dims, log=lambda message: click.echo(message, err=True))
    if as_json:
        click.echo(json.dumps(description))
        return
    click.echo(f"{output}: {len(description['kernels'])} kernels for {', '.join(arch_name(a) for a in archs)} "
               f"(Triton {description['triton']}); {len(description['rejected'])} tiles rejected")
    for skip in description["skipped"]:
        click.echo(f"  skipped {skip['arch']} {skip['precision']}{' ' + skip['dtype'] if 'dtype' in skip else ''}: {skip['reason']}")
