"""`build-engine --attention plugin` without `--plugin DIR`: the plugin folder compiled for the build GPU into the cache."""

from __future__ import annotations

import pytest

from wanrt.export.trt.stage import cached_plugin
from wanrt.plugins_trt.aot import arch_name, kernel_source_digest, read_plugin

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")


def test_compiles_once_then_reuses_and_recompiles_a_damaged_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    lines: list[str] = []
    folder = cached_plugin(89, "fp8", "bf16", 64, lines.append, root=tmp_path / "plugins")
    assert folder.parent == tmp_path / "plugins" and kernel_source_digest()[:16] in folder.name
    description = read_plugin(folder)  # complete: every kernel file present and matching its sha256
    assert {(r["arch"], r["precision"], r["dtype"], r["head_dim"]) for r in description["kernels"]} == {(arch_name(89), "fp8", "bf16", 64)}
    assert any("compiling the attention plugin's fp8 kernels for sm_89" in line for line in lines)

    lines.clear()
    assert cached_plugin(89, "fp8", "bf16", 64, lines.append, root=tmp_path / "plugins") == folder
    assert lines == []  # reused, nothing compiled

    kernel = folder / description["kernels"][0]["ptx"]
    kernel.write_text(kernel.read_text() + "\n// changed")
    assert cached_plugin(89, "fp8", "bf16", 64, lines.append, root=tmp_path / "plugins") == folder
    assert lines and read_plugin(folder)  # compiled again, complete


def test_the_digest_follows_the_kernel_source(tmp_path, monkeypatch):
    import wanrt.plugins_trt.aot as aot

    before = kernel_source_digest()
    copy = tmp_path / "plugins_trt"
    copy.mkdir()
    for name in aot.KERNEL_SOURCES:
        (copy / name).write_bytes((aot.Path(aot.__file__).parent / name).read_bytes())
    monkeypatch.setattr(aot, "__file__", str(copy / "aot.py"))
    assert kernel_source_digest() == before  # the same sources
    (copy / "flash_kernel.py").write_text((copy / "flash_kernel.py").read_text() + "\n# changed\n")
    assert kernel_source_digest() != before
