"""Fixtures: tiny models written once per session by `make_tiny_model`, and a copy of one to damage.

Assertions in these tests come from the reference facts (wan-architecture.md,
lightx2v-formats.md, peer-formats.md) and the parameters the test asked for, never from the
writer's own tables.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

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


@pytest.fixture
def official_copy(tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("wan2.1", "t2v", "official"), dst)
    return dst
