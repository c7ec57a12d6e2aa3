"""Remembered sha256 digests: keyed by file state, kept across renames, never trusted by `verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from cli import cli
from wanrt.engines.digests import cache_file, cached_sha256, file_stamp, hash_and_remember
from wanrt.engines.errors import BundleError
from wanrt.engines.manifest import Component, Manifest, staging_dir, verify_bundle, write_manifest
from wanrt.engines.model import DiTConfig, SamplingDefaults, VAEInfo
from wanrt.engines.signatures import text_encoder_signature


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WANRT_CACHE_DIR", str(tmp_path / "cache"))


def flip_first_byte_keeping_mtime(path):
    """Corrupt a file without changing its size or mtime (what the remembered stamp cannot see)."""
    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_digest_is_the_file_sha256_and_is_remembered_per_state(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 16))
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert cached_sha256([f]) == {str(f): want}
    assert json.loads(cache_file().read_text()) == {file_stamp(f): want}
    f.write_bytes(b"x" + f.read_bytes()[1:])  # new content and mtime: hashed again
    assert cached_sha256([f])[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest() != want


def test_a_rename_keeps_the_remembered_digest(tmp_path):
    f = tmp_path / "staged.bin"
    f.write_bytes(b"weights" * 1000)
    staged = hash_and_remember([f])[str(f)]  # what a build records while the bundle is staged
    flip_first_byte_keeping_mtime(f)
    moved = tmp_path / "final.bin"
    os.rename(f, moved)
    assert cached_sha256([moved]) == {str(moved): staged}  # not re-read (it would differ now)
    assert hash_and_remember([moved], use_remembered=False)[str(moved)] != staged
    shutil.copy2(moved, tmp_path / "copy.bin")  # a copy is a new file: hashed for real
    copy = tmp_path / "copy.bin"
    assert cached_sha256([copy])[str(copy)] == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_unwritable_cache_is_only_slower(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("WANRT_CACHE_DIR", str(blocker))
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert cached_sha256([f])[str(f)] == hashlib.sha256(b"abc").hexdigest()


def small_bundle(root):
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "model.onnx").write_bytes(os.urandom(4096))
    comp = Component("text_encoder", "text_encoder", "text_encoder/model.onnx", text_encoder_signature(8), "fp32",
                     files=["text_encoder/model.onnx"])  # fmt: skip
    dit = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=8)
    write_manifest(root, Manifest(family="wan2.1", task="t2v", dit=dit, vae=VAEInfo.for_version("2.1"),
                                  components={"text_encoder": comp}, sampling=SamplingDefaults()))  # fmt: skip
    return root / "text_encoder" / "model.onnx"


def test_run_trusts_remembered_digests_and_verify_does_not(tmp_path):
    bundle = tmp_path / "bundle"
    onnx = small_bundle(bundle)
    verify_bundle(bundle, remembered=True)
    flip_first_byte_keeping_mtime(onnx)
    verify_bundle(bundle, remembered=True)  # same stamp: the remembered digest is used (the documented trade)
    with pytest.raises(BundleError, match="model.onnx: sha256 mismatch"):
        verify_bundle(bundle)
    result = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert result.exit_code == 2 and "sha256 mismatch" in result.stderr
    out = tmp_path / "o.mp4"
    result = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "x", "--rehash", "-o", str(out)])
    assert result.exit_code == 2 and "sha256 mismatch" in result.stderr and not out.exists()


def test_bundle_folders_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with staging_dir(tmp_path / "staged") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert oct((tmp_path / "staged").stat().st_mode & 0o777) == oct(0o755)
