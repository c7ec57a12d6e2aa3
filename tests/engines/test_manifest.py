"""The bundle contract: manifest round trip, verification, atomic staging, CLI `verify`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wanrt.engines.errors import BundleError
from wanrt.engines.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    read_manifest,
    staging_dir,
    verify_bundle,
    write_manifest,
)

from .conftest import make_small_bundle

REPO = Path(__file__).resolve().parents[2]


def test_manifest_round_trip_and_hashes(tmp_path):
    m = make_small_bundle(tmp_path / "b")
    back = verify_bundle(tmp_path / "b")
    assert back.to_dict() == m.to_dict()
    assert back.experts == ["dit_high_noise", "dit_low_noise"]
    assert back.sampling.guide_scale == (3.0, 4.0) and back.sampling.boundary == 0.875
    data = (tmp_path / "b" / "dit_low_noise" / "model.onnx.data").read_bytes()
    entry = back.files["dit_low_noise/model.onnx.data"]
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert "tokenizer/tokenizer.json" in back.files


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated"),
        (lambda p: p.write_bytes(b"\xff" + p.read_bytes()[1:]), "sha256 mismatch"),
    ],
)
def test_verify_names_the_damaged_file(tmp_path, damage, message):
    make_small_bundle(tmp_path / "b")
    victim = tmp_path / "b" / "dit_high_noise" / "model.onnx.data"
    damage(victim)
    with pytest.raises(BundleError) as e:
        verify_bundle(tmp_path / "b")
    assert str(victim) in str(e.value) and message in str(e.value)


def test_quick_verify_skips_hashes_but_catches_size(tmp_path):
    make_small_bundle(tmp_path / "b")
    victim = tmp_path / "b" / "dit_high_noise" / "model.onnx.data"
    victim.write_bytes(b"\x01" + victim.read_bytes()[1:])
    verify_bundle(tmp_path / "b", check_hashes=False)
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(BundleError, match="truncated or replaced"):
        verify_bundle(tmp_path / "b", check_hashes=False)


def test_unknown_schema_version_and_malformed_manifests(tmp_path):
    make_small_bundle(tmp_path / "b")
    path = tmp_path / "b" / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"unknown schema_version {SCHEMA_VERSION + 1}"):
        read_manifest(tmp_path / "b")
    data["schema_version"] = SCHEMA_VERSION
    del data["dit"]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="manifest.json: dit: missing \\(expected an object\\)"):
        read_manifest(tmp_path / "b")
    path.write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path / "b")
    with pytest.raises(BundleError, match="not a bundle folder"):
        read_manifest(tmp_path / "nope")


def test_staging_replaces_atomically_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "b"
    make_small_bundle(target)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        with staging_dir(target) as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left, old bundle intact
    verify_bundle(target)
    with staging_dir(target) as tmp:
        make_small_bundle(tmp / "inner")
        (tmp / "marker").write_text("new")
    assert (target / "marker").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_staging_refuses_to_replace_a_folder_that_is_not_amake_small_bundle(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a wanrt bundle; refusing to overwrite"):
        with staging_dir(target):
            pass
    assert (target / "notes.txt").read_text() == "keep me"
    with staging_dir(target, force=True) as tmp:
        (tmp / "x").write_text("y")
    assert not (target / "notes.txt").exists()


def test_verify_cli_exit_codes(tmp_path):
    make_small_bundle(tmp_path / "b")
    ok = subprocess.run([sys.executable, "cli.py", "verify", str(tmp_path / "b"), "--json"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["components"] == ["dit_high_noise", "dit_low_noise"]
    (tmp_path / "b" / "dit_low_noise" / "model.onnx").unlink()
    bad = subprocess.run([sys.executable, "cli.py", "verify", str(tmp_path / "b")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "dit_low_noise/model.onnx: missing" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_plan_only_component_round_trips_and_one_without_graph_or_plan_is_refused(tmp_path):
    """`--target trt` bundles keep plans only (onnx null); a component with neither cannot run and is a BundleError."""
    from dataclasses import replace

    from wanrt.engines.plans import PlanInfo, ProfileShapes

    root = tmp_path / "b"
    m = make_small_bundle(root)
    plan_rel = "dit_low_noise/model.trt11.4.0.106.sm90.plan"
    (root / plan_rel).write_bytes(b"plan bytes")
    for rel in ("dit_low_noise/model.onnx", "dit_low_noise/model.onnx.data"):
        (root / rel).unlink()
    profile = ProfileShapes({"latent": ((1, 16, 1, 2, 2), (2, 16, 21, 60, 104), (2, 16, 21, 104, 104))})
    plan = PlanInfo(plan_rel, "11.4.0.106", "9.0", weight_streaming=True, streamable_weights_bytes=123, profiles=[profile],
                    builder_flags=["WEIGHT_STREAMING"])  # fmt: skip
    comps = dict(m.components)
    comps["dit_low_noise"] = replace(comps["dit_low_noise"], onnx=None, files=[], plans=[plan])
    write_manifest(root, replace(m, components=comps))
    back = verify_bundle(root)
    assert back.components["dit_low_noise"].onnx is None
    assert back.components["dit_low_noise"].plans == [plan]
    assert back.files[plan_rel]["sha256"] == hashlib.sha256(b"plan bytes").hexdigest()
    raw = json.loads((root / MANIFEST_NAME).read_text())
    raw["components"]["dit_low_noise"]["plans"] = []
    (root / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="no ONNX graph .* and no TensorRT plan"):
        read_manifest(root)
