"""`build-engine --target trt|all` and `selftest-trt` where TensorRT's builder or a GPU is missing: one line, exit 2, nothing written.

Two cases run here: no TensorRT at all (this machine), and the real TensorRT 11.4 bindings
imported through stand-in libraries (`tests/trt_stub.py`) on a machine without a GPU.  The
stand-in only lets the real module import: nothing is built through it, and the test checks
the build stops at the GPU check, before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.helpers import assert_one_line_error
from tests.trt_stub import ALIAS_TENSORRT, stub_env
from wanrt.export.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[3]


def tensorrt_imports() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "model", "wan2.1", "t2v", seed=3)


@pytest.mark.skipif(tensorrt_imports(), reason="TensorRT imports here: the missing-TensorRT path cannot be taken")
@pytest.mark.parametrize("target", ["trt", "all"])
def test_without_tensorrt_build_engine_names_the_install_and_writes_nothing(tmp_path, tiny, target):
    out = tmp_path / "bundle"
    assert_one_line_error(["build-engine", tiny, "-o", out, "--target", target], f"--target {target} needs TensorRT",
                          'pip install "wanrt[trt]"')  # fmt: skip
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(tensorrt_imports(), reason="TensorRT imports here: the missing-TensorRT path cannot be taken")
def test_without_tensorrt_refit_and_selftest_name_the_install(tmp_path):
    assert_one_line_error(["selftest-trt", "--keep", tmp_path / "k"], "selftest-trt needs TensorRT", 'pip install "wanrt[trt]"')
    assert not (tmp_path / "k").exists() or list((tmp_path / "k").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--target", "onnx", "--opt-level", "4"], "--opt-level: a TensorRT build option; it needs --target trt or all"),
    (["--target", "onnx", "--sizes", "480p"], "--sizes: a TensorRT build option"),
    (["--target", "trt", "--frames", "80"], "--frames 80: the frame count must be 4k+1"),
    (["--target", "trt", "--sizes", "832x470"], "--sizes 832x470: width and height must be multiples of 16"),
    (["--target", "trt", "--strip-plan"], "--strip-plan: a stripped plan gets its weights by refitting"),
    (["--target", "trt", "--refittable", "--strip-plan"], "use --target all"),
    (["--target", "all", "--opt-level", "7"], "--opt-level 7: expected 0..5"),
    (["--target", "onnx", "--attention-precision", "fp8"], "--attention-precision: a TensorRT build option"),
    (["--target", "all", "--attention-precision", "int8"], "--attention-precision int8: the plugin's QK^T precision; it needs --attention plugin"),
    (["--target", "all", "--attention", "plugin", "--attention-precision", "fp4"], "Invalid value for '--attention-precision'"),
    (["--target", "tensorrt"], "Invalid value for '--target'"),
])  # fmt: skip
def test_bad_options_fail_before_anything_is_written(tmp_path, tiny, args, message):
    out = tmp_path / "bundle"
    from tests.export.helpers import run_cli

    r = run_cli("build-engine", tiny, "-o", out, *args)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not out.exists()


def test_real_tensorrt_bindings_without_a_gpu_stop_at_the_gpu_check(tmp_path, tiny, stub_folder):
    """The real 11.4 module imports (stand-in libraries), our version check accepts it, the flag tables hold its
    members, and the build stops naming the missing GPU with nothing written."""
    out = tmp_path / "bundle"
    code = ALIAS_TENSORRT + f"""import cli, json, sys
from wanrt.export.trt.api import import_tensorrt, network_flags
from wanrt.export.trt.config import builder_flag_table
trt = import_tensorrt()
table = builder_flag_table(trt)
print("FACTS " + json.dumps({{"version": trt.__version__, "names": {{k: str(v) for k, v in table.items()}},
                  "flags11": network_flags(trt), "flags10": network_flags(trt, major=10),
                  "aot": network_flags(trt, plugin=True), "strongly": int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),
                  "prefer_aot": int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)}}))
sys.argv = ["cli.py", "build-engine", {str(tiny)!r}, "-o", {str(out)!r}, "--target", "all"]
cli.main()
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=stub_env(stub_folder), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    facts = json.loads(next(line[6:] for line in res.stdout.splitlines() if line.startswith("FACTS ")))
    assert facts["version"].startswith("11.")
    assert all(str(v).endswith(k) for k, v in facts["names"].items()), facts["names"]  # e.g. BuilderFlag.REFIT
    # 11.x: strongly typed always, the flag is ignored, so none is passed; 10.x needs it explicitly
    assert facts["flags11"] == 0 and facts["flags10"] == 1 << facts["strongly"]
    assert facts["aot"] == 1 << facts["prefer_aot"]
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--target all needs an NVIDIA GPU to build TensorRT plans on" in lines[0], res.stderr[-2000:]
    assert not out.exists()
