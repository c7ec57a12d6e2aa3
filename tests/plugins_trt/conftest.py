"""Fixtures for the plugin tests: a private Triton cache and plugin folders built once per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def triton_cache(tmp_path_factory):
    """A private Triton cache for this session's compiles (nothing served from ~/.triton)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    yield os.environ["TRITON_CACHE_DIR"]
    if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def plugin_folder(tmp_path_factory, triton_cache):
    """(folder, plugin.json) of `build_plugin` for sm_80 and sm_90, bf16, head size 64 (built once)."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from wanrt.plugins_trt.aot import build_plugin

    folder = tmp_path_factory.mktemp("plugin") / "attention"
    return folder, build_plugin(folder, (80, 90), ("bf16",), ("bf16",), (64,))
