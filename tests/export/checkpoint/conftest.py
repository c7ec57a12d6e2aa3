"""Fixtures: tiny models written once per session by `make_tiny_model`, and a CLI runner.

Assertions in these tests come from the reference facts (wan-architecture.md,
lightx2v-formats.md, peer-formats.md) and the parameters the test asked for, never from the
writer's own tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from wanrt.export.tiny import make_tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (10x on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model(family, task, layout="official", seed=0)` -> folder (written once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple, Path] = {}

    def get(family: str, task: str, layout: str = "official", seed: int = 0) -> Path:
        key = (family, task, layout, seed)
        if key not in cache:
            cache[key] = make_tiny_model(root / "-".join(map(str, key)), family, task, layout, seed)
        return cache[key]

    return get


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str) -> CliResult:
    """Run `python cli.py ARGS` in-process (the real click group, lazy command loading included)."""
    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)
