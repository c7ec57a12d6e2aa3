"""Every TensorRT name our code uses exists in the real 11.4 bindings (`tests/data/`), with a fitting arity.

The checker (`tests/tensorrt_surface.py`) first proves it catches misspelled module attributes,
enum members, methods, argument counts, read-only properties and names reached through
inferred return types; then it runs over every project file that uses TensorRT. Runtime code
must also fit `tensorrt_lean` (what an inference box with version-compatible plans has).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.tensorrt_surface import Surface, check_source

REPO = Path(__file__).resolve().parents[1]

GOOD = '''
import tensorrt as trt

def build(onnx_path: str, logger: "trt.ILogger"):
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parser.parse_from_file(onnx_path)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    config.builder_optimization_level = 3
    profile = builder.create_optimization_profile()
    profile.set_shape("latent", (1, 16, 1, 2, 2), (1, 16, 21, 60, 104), (2, 16, 21, 90, 160))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)

class Engine:
    def __init__(self, engine: "trt.ICudaEngine"):
        self.engine = engine
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def run(self, ptr: int, stream: int):
        self.engine.weight_streaming_budget_v2 = 1 << 30
        self.context.set_device_memory(ptr, self.engine.device_memory_size_v2)
        return self.context.execute_async_v3(stream)
'''

# (snippet with one mistake, the words the error must contain)
BAD = [
    ("trt.BuilderFlg.FP16", "trt.BuilderFlg is not in tensorrt"),
    ("trt.BuilderFlag.FP16", "BuilderFlag has no member FP16"),
    ("def f(b: 'trt.Builder'):\n    b.create_netwrk(0)", "Builder.create_netwrk is not an attribute"),
    ("def f(b: 'trt.Builder'):\n    b.create_network().add_attenton(1, 2, 3)", "INetworkDefinition.add_attenton is not an attribute"),
    ("def f(e: 'trt.ICudaEngine'):\n    e.streamable_weights_size = 3", "ICudaEngine.streamable_weights_size is assigned but is not a writable property"),
    ("def f(c: 'trt.IExecutionContext'):\n    c.set_tensor_address('x')", "no signature takes 1 positional argument"),
    ("def f(c: 'trt.IExecutionContext'):\n    c.execute_async_v3(stream=0)", "keywords ['stream']"),
    ("trt.Runtime(1, 2)", "trt.Runtime(...): no signature takes 2 positional"),
    ("import tensorrt.plugin as trtp\n@trtp.registr('wanrt::X')\ndef f(): pass", "trtp.registr is not in tensorrt.plugin"),
    ("def f(e: 'trt.ICudaEngine'):\n    e.device_memory_size", "ICudaEngine.device_memory_size is not an attribute"),
]


@pytest.fixture(scope="module")
def full() -> Surface:
    return Surface.load("tensorrt")


@pytest.fixture(scope="module")
def lean() -> Surface:
    return Surface.load("tensorrt_lean")


def test_correct_code_passes_and_is_really_checked(full):
    findings = check_source("good.py", full, source=GOOD)
    assert [f for f in findings if f.kind == "error"] == []
    checked = {f.text.split(" with ")[0] for f in findings if f.kind == "checked"}
    for name in ("trt.Builder(...)", "Builder.create_network(...)", "IBuilderConfig.builder_optimization_level = ...",
                 "IOptimizationProfile.set_shape(...)", "ICudaEngine.weight_streaming_budget_v2 = ...",
                 "IExecutionContext.set_device_memory(...)", "trt.BuilderFlag.WEIGHT_STREAMING"):
        assert name in checked, (name, sorted(checked))


@pytest.mark.parametrize("snippet,message", BAD)
def test_each_kind_of_mistake_is_caught(full, snippet, message):
    errors = [f.text for f in check_source("bad.py", full, source="import tensorrt as trt\n" + snippet) if f.kind == "error"]
    assert len(errors) == 1 and message in errors[0], errors


def test_lean_surface_lacks_the_builder(lean):
    errors = [f.text for f in check_source("x.py", lean, source="import tensorrt_lean as trt\ntrt.Builder") if f.kind == "error"]
    assert errors and "trt.Builder is not in tensorrt_lean" in errors[0]


# Runtime files that need the full tensorrt (its ONNX refitter), never run by tensorrt_lean: checked against the full surface only.
FULL_ONLY_RUNTIME = {"runtime/backends/tensorrt_refit.py"}
# A function taking the TensorRT module as its parameter `trt` (our convention), or binding it from `import_tensorrt`.
TAKES_TRT = re.compile(r"def \w+\(trt\b|\btrt = import_tensorrt\(")


def tensorrt_users() -> list[Path]:
    """Project files that use TensorRT: import it, or take it as `trt` (tests and bench excluded; untracked files too)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    out = []
    for rel in listed:
        if rel.startswith(("tests/", "bench/")) or not (REPO / rel).is_file():
            continue
        text = (REPO / rel).read_text()
        if "import tensorrt" in text or "import_module(\"tensorrt" in text or TAKES_TRT.search(text):
            out.append(REPO / rel)
    return out


def test_the_build_and_refit_code_is_among_the_checked_files():
    users = {p.relative_to(REPO).as_posix() for p in tensorrt_users()}
    for rel in ("export/trt/api.py", "export/trt/config.py", "export/trt/engine.py", "export/trt/refit.py",
                "runtime/backends/tensorrt.py", "runtime/backends/tensorrt_refit.py"):  # fmt: skip
        assert rel in users, (rel, sorted(users))


def test_every_tensorrt_name_in_the_project_exists(full, lean):
    problems = []
    for path in tensorrt_users():
        findings = check_source(path, full)
        problems += [f"{f.path}:{f.line}: {f.text}" for f in findings if f.kind == "error"]
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("runtime/") and rel not in FULL_ONLY_RUNTIME:
            problems += [f"{f.path}:{f.line}: (lean) {f.text}" for f in check_source(path, lean) if f.kind == "error"]
    assert not problems, "\n".join(problems)
