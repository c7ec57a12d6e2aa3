"""plugin-build without a GPU: cubins and PTX for sm_80 and sm_90, checked as ELF files for the right
architecture naming the kernel the plugin launches; plugin.json; the CLI's bad-input errors."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from wanrt.engines.errors import WanrtError
from wanrt.engines.plans import PluginRecord

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from wanrt.plugins_trt.aot import (  # noqa: E402
    PLUGIN_JSON, PluginBuildError, build_plugin, kernel_table, launch_problems, parse_arch, parse_archs, plan_variants,
    plugin_record, read_plugin,
)  # fmt: skip
from wanrt.plugins_trt.kernels import KERNEL_NAME  # noqa: E402
from wanrt.plugins_trt.tiles import ARCHS, candidates  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EM_CUDA = 190


def cuda_elf_arch(data: bytes) -> tuple[int, str]:
    """(sm, kernel names) from a CUDA ELF header: ABI 7 keeps the SM in e_flags' low byte, ABI 8 in the next one."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    (e_machine,) = struct.unpack_from("<H", data, 18)
    assert e_machine == EM_CUDA, e_machine
    (e_flags,) = struct.unpack_from("<I", data, 48)
    abi = data[8]
    return (e_flags & 0xFF) if abi < 8 else (e_flags >> 8) & 0xFF, abi


def elf_section_names(data: bytes) -> list[str]:
    e_shoff, = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 58)
    headers = [struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    strtab_offset = headers[e_shstrndx][4]
    names = []
    for name_offset, *_ in headers:
        end = data.index(b"\0", strtab_offset + name_offset)
        names.append(data[strtab_offset + name_offset:end].decode())
    return names


def test_cubins_are_elf_for_their_architecture_and_name_the_kernel(plugin_folder):
    folder, description = plugin_folder
    from triton import knobs

    assert {r["arch"] for r in description["kernels"]} == {"sm_80", "sm_90"}
    for record in description["kernels"]:
        data = (folder / record["cubin"]).read_bytes()
        sm, abi = cuda_elf_arch(data)
        assert f"sm_{sm}" == record["arch"], (record["cubin"], sm, abi)
        assert f".text.{record['kernel_name']}" in elf_section_names(data)
        assert record["kernel_name"] == KERNEL_NAME
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "-lelf", str(folder / record["cubin"])],
                                 capture_output=True, text=True, check=True).stdout
        assert re.search(rf"\bsm_{sm}a?\b", listing), listing
        ptx = (folder / record["ptx"]).read_text()
        assert re.search(rf"^\.target sm_{sm}a?$", ptx, flags=re.MULTILINE)
        assert re.search(rf"^\.version {re.escape(record['ptx_isa'])}$", ptx, flags=re.MULTILINE)
        assert record["ptx_isa"] == "8.4"  # the oldest ISA sm_80..sm_90 take (driver r550+)
        assert f".visible .entry {KERNEL_NAME}(" in ptx
        # the launch ABI TensorRT uses: 3 pointers, 3 int32 scalars, 1 pointer (+ Triton's 2 scratch pointers)
        params = re.findall(r"\.param \.(u64|u32|b32|b64)", ptx.split(f".entry {KERNEL_NAME}(")[1].split(")")[0])
        assert params[:7] == ["u64", "u64", "u64", "u32", "u32", "u32", "u64"], params


def test_sm90_kernels_use_wgmma_and_sm80_mma_sync(plugin_folder):
    folder, description = plugin_folder
    for record in description["kernels"]:
        ptx = (folder / record["ptx"]).read_text()
        assert ("wgmma.mma_async" in ptx) == (record["arch"] == "sm_90")
        assert ("mma.sync" in ptx) == (record["arch"] == "sm_80")


def test_plugin_json_describes_tactics_and_resources(plugin_folder):
    folder, description = plugin_folder
    assert read_plugin(folder) == description == json.loads((folder / PLUGIN_JSON).read_text())
    assert description["plugin"] == {"name": "WanAttention", "version": "1", "namespace": "wanrt"}
    assert set(description["ptxas"]) == {"sm_80", "sm_90"}
    for arch in (80, 90):
        records = kernel_table(description, arch, "bf16")[("bf16", 64)]
        assert [r["tactic"] for r in records] == list(range(1, len(records) + 1))
        offered = [tuple(r["tile"].values()) for r in records]
        listed = [tuple(t.to_dict().values()) for t in candidates(arch, "bf16", 64)]
        assert offered == [t for t in listed if t in offered]  # candidate order kept
        for r in records:
            assert r["shared_bytes"] <= ARCHS[arch].max_shared_bytes and r["stack_bytes"] == 0 and r["registers"] <= 255
        assert min(r["shared_bytes"] for r in records) <= 48 * 1024  # a tile for launches without the opt-in
    assert plugin_record(description, "bf16") == PluginRecord("WanAttention", "wanrt", "1", "bf16", ["sm_80", "sm_90"])
    assert plugin_record(description, "bf16", archs=[90]).kernel_archs == ["sm_90"]
    with pytest.raises(PluginBuildError, match="no fp8 kernels"):
        plugin_record(description, "fp8")


def test_read_plugin_names_a_changed_kernel_file(plugin_folder, tmp_path):
    folder, description = plugin_folder
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    target = copy / description["kernels"][0]["ptx"]
    target.write_text(target.read_text() + "\n")
    with pytest.raises(PluginBuildError, match=re.escape(description["kernels"][0]["ptx"]) + ".*sha256"):
        read_plugin(copy)
    with pytest.raises(PluginBuildError, match="no fp8 kernels for sm_80"):
        kernel_table(description, 80, "fp8")


def test_signature_follows_the_kernels_parameters():
    from wanrt.plugins_trt.kernels import KernelSpec, TileConfig, flash_kernel

    spec = KernelSpec("fp8", "bf16", 128, TileConfig(64, 64, 4, 2))
    assert list(spec.signature()) == flash_kernel().arg_names  # names and order: TensorRT passes them positionally
    assert list(spec.pointer_alignment()) == [(0,), (1,), (2,), (6,)]


def test_plan_skips_fp8_below_sm89_and_parses_arch_names():
    variants, skipped = plan_variants((80, 89), ("bf16", "fp8"), ("bf16", "fp32"), (128,))
    assert variants == [(80, "bf16", "bf16", 128), (80, "bf16", "fp32", 128), (89, "bf16", "bf16", 128),
                        (89, "bf16", "fp32", 128), (89, "fp8", "bf16", 128)]
    assert [(s["arch"], s["precision"], s.get("dtype")) for s in skipped] == [("sm_80", "fp8", None), ("sm_89", "fp8", "fp32")]
    assert parse_archs("sm_80, 90,sm_90a,8.6") == (80, 90, 86)
    for bad in ("sm_75", "gfx90a", "sm_"):
        with pytest.raises(WanrtError, match="sm_|architecture"):
            parse_arch(bad)


def test_launch_problems_names_what_tensorrt_cannot_provide():
    class Metadata:
        global_scratch_size, profile_scratch_size, num_ctas, launch_pdl, tensordesc_meta = 256, 0, 2, True, []

    assert launch_problems(Metadata()) == ["global_scratch_size=256 (TensorRT passes no scratch buffer)", "num_ctas=2", "launch_pdl"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def test_cli_plugin_build_fp8_for_sm89(tmp_path, triton_cache):
    result = run_cli("plugin-build", "--gpu-arch", "sm_89", "--precision", "fp8", "--head-dim", "64", "-o", str(tmp_path / "p"), "--json",
                     env=dict(os.environ, TRITON_CACHE_DIR=triton_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    description = json.loads(result.stdout)
    assert {(r["arch"], r["precision"], r["dtype"], r["head_dim"]) for r in description["kernels"]} == {("sm_89", "fp8", "bf16", 64)}
    assert "[1/" in result.stderr  # progress, one line per kernel
    ptx = (tmp_path / "p" / description["kernels"][0]["ptx"]).read_text()
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "e4m3.e4m3" in ptx  # fp8 quantization and fp8 mma


@pytest.mark.parametrize("args,message", [
    (["--gpu-arch", "sm_75"], "sm_75"),
    (["--gpu-arch", "sm_80", "--precision", "fp8"], "nothing to build: sm_80 fp8 needs sm_89 or newer"),
    (["--gpu-arch", "sm_90", "--precision", "fp4"], "--precision 'fp4'"),
    (["--gpu-arch", "sm_90", "--head-dim", "96"], "--head-dim '96'"),
])  # fmt: skip
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli("plugin-build", *args, "-o", str(tmp_path / "p"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "p").exists()


def test_cli_refuses_to_replace_a_folder_that_is_not_a_plugin(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "precious.txt").write_text("keep")
    result = run_cli("plugin-build", "--gpu-arch", "sm_90", "-o", str(tmp_path / "p"))
    assert result.returncode == 2 and "not a plugin folder" in result.stderr
    assert (tmp_path / "p" / "precious.txt").read_text() == "keep"
