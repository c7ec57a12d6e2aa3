"""Fixtures for the runtime tests; the bundle builders live in `bundles.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.bundles import make_bundle


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """`bundle_factory(tag, **make_bundle_kwargs)` -> bundle path (built once per tag per session)."""
    cache: dict[str, Path] = {}

    def factory(tag: str, **kw) -> Path:
        if tag not in cache:
            cache[tag] = make_bundle(tmp_path_factory.mktemp(tag) / "bundle", **kw)
        return cache[tag]

    return factory

