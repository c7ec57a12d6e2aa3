#!/usr/bin/env python3
"""wanrt command line: a thin click layer.  Each command lives in the package that owns it.

Commands are imported only when invoked, so `run` and `verify` never import torch.  Installed,
this is `wanrt.cli:main` (the `wanrt` command); from a checkout, `python cli.py` first binds the
package name `wanrt` to the checkout, so the two forms run the same code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


def bind_checkout() -> None:
    """Make `import wanrt` mean the folder this file is in (a checkout), ahead of any installed copy."""
    root = Path(__file__).resolve().parent
    bound = sys.modules.get("wanrt")
    if bound is not None and Path(bound.__file__).resolve().parent == root:
        return
    spec = importlib.util.spec_from_file_location("wanrt", root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["wanrt"] = module
    spec.loader.exec_module(module)


if __package__ != "wanrt":  # `python cli.py` or `import cli` from a checkout
    bind_checkout()

import click  # noqa: E402

from wanrt.engines.errors import WanrtError  # noqa: E402
from wanrt.engines.interrupts import install_handlers  # noqa: E402

# What the `export` extra installs (`pip install .` alone is the torch-free runtime side).
EXPORT_EXTRA = ("torch", "safetensors", "onnx", "onnxscript", "ml_dtypes")
# What the `serve` extra (`ray[serve]`) brings that `serve` imports.
SERVE_EXTRA = ("ray", "fastapi", "uvicorn")


@dataclass(frozen=True)
class CommandEntry:
    """Where a command lives, its one-line help, and the modules it needs beyond the runtime install."""

    target: str  # "module:attribute"
    help: str
    needs: tuple[str, ...] = ()
    extra: str = "export"  # the pyproject extra that installs `needs`


COMMANDS: dict[str, CommandEntry] = {
    "make-tiny-model": CommandEntry("wanrt.export.tiny:make_tiny_model_command", "Write a tiny random Wan checkpoint in a real on-disk layout.", EXPORT_EXTRA),
    "inspect": CommandEntry("wanrt.export.checkpoint.command:inspect_command", "Detect a checkpoint's layout, precision and components (headers only)."),
    "convert": CommandEntry("wanrt.export.convert:convert_command", "Merge LoRAs / quantize into a single LightX2V-layout safetensors file.", EXPORT_EXTRA),
    "build-engine": CommandEntry("wanrt.export.build:build_engine_command", "Export a model's components to ONNX (and TensorRT) as a verifiable bundle.", EXPORT_EXTRA),
    "refit": CommandEntry("wanrt.export.trt.refit:refit_command", "Swap LoRA-merged weights into a bundle's refittable TensorRT plans (no rebuild).", EXPORT_EXTRA),
    "selftest-trt": CommandEntry("wanrt.export.trt.selftest:selftest_command", "Build the tiny model with TensorRT and compare every component with ONNX Runtime (needs TensorRT and a GPU).", EXPORT_EXTRA),
    "plugin-build": CommandEntry("wanrt.plugins_trt.command:plugin_build_command", "Compile the attention plugin's kernels ahead of time (PTX + cubin per GPU architecture).", ("triton",), "trt"),
    "lint-onnx": CommandEntry("wanrt.export.onnx.lint:lint_onnx_command", "Check an ONNX file against what TensorRT's ONNX parser accepts.", ("onnx",)),
    "verify": CommandEntry("wanrt.engines.command:verify_command", "Check a bundle's schema and the sha256 of every file."),
    "run": CommandEntry("wanrt.runtime.command:run_command", "Generate a video from a bundle (torch-free runtime)."),
    "serve": CommandEntry("wanrt.runtime.serve.command:serve_command", "Serve a bundle over HTTP on Ray Serve (one replica per GPU).", SERVE_EXTRA, "serve"),
}


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Those of `names` that cannot be imported here (found without importing them)."""
    return [n for n in names if importlib.util.find_spec(n) is None]


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        entry = COMMANDS[name]
        if ctx.resilient_parsing or "--help" in sys.argv[1:2]:
            # `cli.py --help` lists commands without importing them.
            return click.Command(name, help=entry.help, short_help=entry.help)
        missing = missing_modules(entry.needs)
        if missing:
            click.echo(f"error: '{name}' needs {', '.join(missing)}, not installed here: pip install \"wanrt[{entry.extra}]\"", err=True)
            ctx.exit(2)
        module, attr = entry.target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        """Run the command (its lazy import included): a WanrtError or an OSError is one line and exit 2;
        Ctrl-C and SIGTERM (`Terminated`) end with 130 / 143 after every `finally` and atomic output has
        cleaned up (click itself would print "Aborted!" and exit 1)."""
        try:
            return super().invoke(ctx)
        except WanrtError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:  # an I/O failure outside the writers that name their output (they raise DiskError)
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as e:
            click.echo(f"\n{getattr(e, 'message', 'interrupted')}: nothing half-written was left behind", err=True)
            ctx.exit(getattr(e, "exit_code", 130))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """wanrt: compiled engines and a thin runtime for Wan2.1 / Wan2.2 video models."""


def main() -> None:
    """Entry point of the installed `wanrt` command: SIGTERM is handled as Ctrl-C is, and neither is lost
    (`engines.interrupts`)."""
    install_handlers()
    cli()


if __name__ == "__main__":
    main()
