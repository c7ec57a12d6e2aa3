"""The TensorRT registration of our plugin: its register / autotune / aot_impl definitions pass the real
`tensorrt.plugin` module's own validation (bindings imported through stand-in libraries), and the
kernels it answers with.  (That every TensorRT name it uses exists is tests/test_tensorrt_api_surface.py's
project-wide check.)"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trt_stub import ALIAS_TENSORRT, stub_env
from wanrt.plugins_trt.tensorrt_plugin import PLUGIN_ID, PluginRegistrationError, load_registration

REPO = Path(__file__).resolve().parents[2]
PLUGINS_TRT = REPO / "plugins_trt"


def kernel_launch_params_written(path: Path) -> list[str]:
    """Attributes our source sets on `trtp.KernelLaunchParams()` values (the surface data lists none for it)."""
    tree = ast.parse(path.read_text())
    holders, written = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "trtp.KernelLaunchParams":
            holders.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                and node.value.id in holders:
            written.add(node.attr)
    return sorted(written)


def run_with_real_bindings(stub_folder: Path, code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ALIAS_TENSORRT + "import cli\n" + code], cwd=REPO,
                            env=stub_env(stub_folder), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_definitions_pass_tensorrt_plugin_validation(stub_folder, plugin_folder):
    folder, _ = plugin_folder
    writes = kernel_launch_params_written(PLUGINS_TRT / "tensorrt_plugin.py")
    assert writes == ["block_x", "grid_x", "grid_y", "shared_mem"]
    out = run_with_real_bindings(stub_folder, f"""
import json
import tensorrt as trt
import tensorrt.plugin as trtp
from tensorrt.plugin import _lib
from wanrt.plugins_trt.tensorrt_plugin import register_plugin, PLUGIN_ID, PluginRegistrationError
registration = register_plugin({str(folder)!r}, "bf16", arch=90, lazy=True)
again = register_plugin({str(folder)!r}, "bf16", arch=90, lazy=True)
try:
    register_plugin({str(folder)!r}, "bf16", arch=80, lazy=True)
    other = "registered"
except PluginRegistrationError as e:
    other = str(e)
definition = _lib.QDP_REGISTRY[PLUGIN_ID]
desc = trtp.TensorDesc()
combos = [c for combination in definition.autotune_func(desc, desc, desc, (desc,)) for c in combination._get_combinations()]
launch = trtp.KernelLaunchParams()
for name in {writes!r}:
    setattr(launch, name, 7)  # KernelLaunchParams raises AttributeError for a name it does not have
print(json.dumps({{
    "same": again is registration,
    "other": other,
    "tensors": definition.input_tensor_names,
    "attrs": {{k: v.__name__ for k, v in definition.input_attrs.items()}},
    "aot_attrs": definition.aot_impl_attr_names,
    "has_aot": definition.aot_impl_func is not None, "has_jit": definition.impl_func is not None,
    "outputs": definition.num_outputs,
    "combos": [[[t.name for t in c.types], [f.name for f in c.layouts], list(c.tactics)] for c in combos],
    "trt": trt.__version__,
}}))
""")
    assert out["trt"] == "11.4.0.106"
    assert out["same"] is True and "already registered" in out["other"]
    assert out["tensors"] == ["q", "k", "v"] and out["attrs"] == {"scale": "float"} and out["aot_attrs"] == ["scale"]
    assert out["has_aot"] and not out["has_jit"] and out["outputs"] == 1
    n_tactics = len(load_registration(folder, "bf16", 90).table[("bf16", 64)])
    assert out["combos"] == [[["BF16"] * 4, ["LINEAR"] * 4, list(range(1, n_tactics + 1))]]


def test_eager_registration_needs_tensorrt_itself(stub_folder, plugin_folder):
    """With the stand-in the registry is NULL: eager registration must fail loudly, not pass silently."""
    folder, _ = plugin_folder
    result = subprocess.run([sys.executable, "-c", ALIAS_TENSORRT + "import cli\n"
                             "from wanrt.plugins_trt.tensorrt_plugin import register_plugin\n"
                             f"register_plugin({str(folder)!r}, 'bf16', arch=90)\n"],
                            cwd=REPO, env=stub_env(stub_folder), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0


def test_registration_selects_kernels_by_dtype_head_size_and_tactic(plugin_folder):
    folder, description = plugin_folder
    registration = load_registration(folder, "bf16", 90)
    records = registration.table[("bf16", 64)]
    assert registration.tactics("bf16") == list(range(1, len(records) + 1)) and registration.tactics("fp16") == []
    assert registration.select("bf16", 64, 2) is records[1]
    assert registration.select("bf16", 64, 99) is records[-1]  # a head size with fewer tactics repeats its last
    assert registration.ptx[records[0]["ptx"]] == (folder / records[0]["ptx"]).read_bytes()
    with pytest.raises(ValueError, match="no bf16 kernel for fp16 inputs with head size 64"):
        registration.select("fp16", 64, 1)
    small = load_registration(folder, "bf16", 90, max_shared_bytes=48 * 1024)
    assert small.table[("bf16", 64)] and all(r["shared_bytes"] <= 48 * 1024 for r in small.table[("bf16", 64)])
    with pytest.raises(PluginRegistrationError, match="within 1024 bytes"):
        load_registration(folder, "bf16", 90, max_shared_bytes=1024)
    assert PLUGIN_ID == "wanrt::WanAttention"
