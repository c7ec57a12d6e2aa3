#!/usr/bin/env python3
"""wanrt command line: a thin click layer.  Each command lives in the package that owns it.

Commands are imported only when invoked, so `run` and `verify` never import torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from engines.errors import WanrtError

# name -> (module:attribute, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("export.tiny:make_tiny_model_command", "Write a tiny random Wan checkpoint in a real on-disk layout."),
    "inspect": ("export.checkpoint.command:inspect_command", "Detect a checkpoint's layout, precision and components (headers only)."),
    "convert": ("export.convert:convert_command", "Merge LoRAs / quantize into a single LightX2V-layout safetensors file."),
    "build-engine": ("export.build:build_engine_command", "Export a model's components to ONNX (and TensorRT) as a verifiable bundle."),
    "lint-onnx": ("export.onnx_lint:lint_onnx_command", "Check an ONNX file against what TensorRT's ONNX parser accepts."),
    "verify": ("engines.command:verify_command", "Check a bundle's schema and the sha256 of every file."),
    "run": ("runtime.command:run_command", "Generate a video from a bundle (torch-free runtime)."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if ctx.resilient_parsing or "--help" in sys.argv[1:2]:
            # `cli.py --help` lists commands without importing them.
            return click.Command(name, help=COMMANDS[name][1], short_help=COMMANDS[name][1])
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WanrtError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """wanrt: compiled engines and a thin runtime for Wan2.1 / Wan2.2 video models."""


if __name__ == "__main__":
    cli()
