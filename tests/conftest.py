"""Suite-wide: `wanrt` is this checkout; remembered digests go to a temporary cache, never ~/.cache/wanrt."""

from __future__ import annotations

import os

import pytest

import cli  # noqa: F401  (binds the package name `wanrt` to this checkout, ahead of an installed copy)


@pytest.fixture(scope="session", autouse=True)
def private_digest_cache(tmp_path_factory):
    old = os.environ.get("WANRT_CACHE_DIR")
    os.environ["WANRT_CACHE_DIR"] = str(tmp_path_factory.mktemp("wanrt-cache"))
    yield
    if old is None:
        os.environ.pop("WANRT_CACHE_DIR", None)
    else:
        os.environ["WANRT_CACHE_DIR"] = old
