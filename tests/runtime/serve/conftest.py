"""Fixtures of the serve tests: the tiny bundles they serve (helpers live in servers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def i2v_bundle(bundle_factory):
    return bundle_factory("wan21_i2v", family="wan2.1", task="i2v", moe=False, clip_tokens=257)


@pytest.fixture(scope="module")
def t2v_bundle(bundle_factory):
    return bundle_factory("moe_t2v")
