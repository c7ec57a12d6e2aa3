"""The traced-graph cache (export.onnx.graph_cache): an export from it equals a fresh trace byte for byte.

References: a fresh export with the cache off (`WANRT_GRAPH_CACHE=0`), and numpy math from the
module's own weights.  The tiny module's output adds a constant folded from its config (a
`linspace`), so an entry holds something besides the weights it must not hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from wanrt.engines.signatures import EngineSignature, TensorSpec
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.onnx import graph_cache, torch_to_onnx
from wanrt.export.onnx.dit import export_dit_onnx
from wanrt.export.onnx.encoders import export_text_encoder_onnx
from wanrt.export.onnx.torch_to_onnx import export_onnx
from wanrt.export.tiny import make_tiny_model

SIG = EngineSignature(
    (TensorSpec("x", "float32", ("batch", "tokens", 8)), TensorSpec("bias", "float32", (4,))),
    (TensorSpec("y", "float32", ("batch", "tokens", 4)),),
    {"batch": (1, 2), "tokens": (1, 64)},
)


class Ramped(torch.nn.Module):
    """Two linears, plus a ramp from 0 to `end` (a constant the optimizer folds into an initializer)."""

    def __init__(self, end: float) -> None:
        super().__init__()
        self.end = end
        self.up = torch.nn.Linear(8, 1024)
        self.down = torch.nn.Linear(1024, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x)) + torch.linspace(0.0, self.end, 4) + bias


def reference(module: Ramped, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    h = x @ sd["up.weight"].T + sd["up.bias"]
    return h @ sd["down.weight"].T + sd["down.bias"] + np.linspace(0.0, module.end, 4, dtype=np.float32) + bias


def ramped(seed: int, end: float = 1.0) -> Ramped:
    torch.manual_seed(seed)
    return Ramped(end).eval()


def export(module: Ramped, out: Path) -> Path:
    export_onnx(module, {"x": torch.randn(2, 5, 8), "bias": torch.randn(4)}, out, SIG, progress=False,
                cache_as={"ramped": module.end})  # fmt: skip
    return out / "model.onnx"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run(graph: Path, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"x": x, "bias": bias})[0]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANRT_GRAPH_CACHE", raising=False)
    return tmp_path / "cache" / "graphs"


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The names of the modules torch.onnx traced (the real trace runs; this only counts)."""
    seen: list[str] = []
    real = torch_to_onnx.trace_to_onnx_ir

    def counting(module, *args, **kwargs):
        seen.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch_to_onnx, "trace_to_onnx_ir", counting)
    return seen


def test_other_weights_from_the_cache_equal_a_fresh_export(cache, traces, tmp_path, monkeypatch):
    export(ramped(0), tmp_path / "a")  # traced and stored
    got = export(ramped(1), tmp_path / "b")  # the same architecture: from the cache
    assert traces == ["Ramped"] and len(list(cache.iterdir())) == 1
    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")
    export(ramped(1), tmp_path / "fresh")
    assert traces == ["Ramped", "Ramped"]
    assert digests(tmp_path / "b") == digests(tmp_path / "fresh")
    x, bias = np.random.default_rng(0).standard_normal((2, 7, 8), np.float32), np.ones(4, np.float32)
    np.testing.assert_allclose(run(got, x, bias), reference(ramped(1), x, bias), rtol=1e-5, atol=1e-5)


class Derived(torch.nn.Module):
    """A non-persistent buffer computed from a weight (as Animate's motion basis is), used transposed: were it
    taken for a constant, its transpose would be folded and cached with the first model's values."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 4, bias=False)
        self.register_buffer("basis", torch.zeros(4, 8), persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x @ self.basis.T + bias


def test_a_buffer_derived_from_the_weights_is_a_weight_too(cache, traces, tmp_path, monkeypatch):
    def export_derived(seed: int, out: Path) -> Path:
        weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
        with torch.device("meta"):
            module = Derived().eval()
        loaders = {"up.weight": lambda: weight, "basis": lambda: 2 * weight}
        export_onnx(module, {"x": torch.empty(2, 5, 8, device="meta"), "bias": torch.empty(4, device="meta")}, out,
                    SIG, weights=loaders, progress=False, cache_as={"derived": 1})  # fmt: skip
        return out / "model.onnx"

    export_derived(0, tmp_path / "a")
    got = export_derived(1, tmp_path / "b")
    assert traces == ["Derived"]
    x = np.ones((1, 3, 8), np.float32)
    want = x @ (2 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).numpy()).T
    np.testing.assert_allclose(run(got, x, np.zeros(4, np.float32)), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")
    export_derived(1, tmp_path / "fresh")
    assert digests(got.parent) == digests(tmp_path / "fresh")


def test_an_entry_holds_the_folded_constants_and_no_weight(cache, tmp_path):
    module = ramped(0)
    export(module, tmp_path / "a")
    (entry,) = cache.iterdir()
    assert json.loads((entry / graph_cache.WEIGHTS_FILE).read_text()) == sorted(module.state_dict())
    graph = onnx.load(str(entry / "model.onnx"), load_external_data=False).graph
    data = (entry / "model.onnx.data").read_bytes()
    stored = {}
    for init in graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        stored[init.name] = data[int(info["offset"]):int(info["offset"]) + int(info["length"])]
    for name in module.state_dict():
        assert stored.pop(name) == bytes(module.state_dict()[name].numel() * 4), name  # a hole reads as zeros
    (constant,) = stored.values()  # the folded ramp, stored as it is
    np.testing.assert_allclose(np.frombuffer(constant, np.float32), np.linspace(0, 1, 4), rtol=1e-6)


def test_the_architecture_description_and_the_tensors_are_in_the_key(cache, traces, tmp_path):
    x, bias = np.ones((1, 3, 8), np.float32), np.zeros(4, np.float32)
    for end in (1.0, 2.0):  # another config: another entry, and its own folded constant
        got = export(ramped(0, end), tmp_path / f"end{end}")
        np.testing.assert_allclose(run(got, x, bias), reference(ramped(0, end), x, bias), rtol=1e-5, atol=1e-5)
    assert traces == ["Ramped", "Ramped"] and len(list(cache.iterdir())) == 2
    wide = ramped(0)
    wide.up, wide.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)  # the same description, other shapes
    args = ({"ramped": 1.0}, SIG, 18, None)
    assert graph_cache.graph_key(args[0], wide, *args[1:]) != graph_cache.graph_key(args[0], ramped(0), *args[1:])
    assert graph_cache.graph_key(args[0], ramped(5), *args[1:]) == graph_cache.graph_key(args[0], ramped(0), *args[1:])


def test_the_export_versions_are_in_the_key(monkeypatch):
    key = graph_cache.graph_key({"ramped": 1.0}, ramped(0), SIG, 18, None)
    monkeypatch.setattr(graph_cache, "export_versions", lambda: {"wanrt_source": "another"})
    assert graph_cache.graph_key({"ramped": 1.0}, ramped(0), SIG, 18, None) != key


def test_a_damaged_entry_is_traced_and_stored_again(cache, traces, tmp_path, monkeypatch):
    export(ramped(0), tmp_path / "a")
    (entry,) = cache.iterdir()
    (entry / "model.onnx").write_bytes(b"\x08garbage")
    got = export(ramped(1), tmp_path / "b")
    assert traces == ["Ramped", "Ramped"]
    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")
    export(ramped(1), tmp_path / "fresh")
    assert digests(got.parent) == digests(tmp_path / "fresh")
    assert graph_cache.load_graph(entry.name, {n: (lambda: None) for n in ramped(0).state_dict()}) is not None


def test_an_entry_with_a_weight_this_module_lacks_is_not_used(cache, tmp_path):
    export(ramped(0), tmp_path / "a")
    (entry,) = cache.iterdir()
    loaders = {n: (lambda: None) for n in ramped(0).state_dict() if n != "down.bias"}
    assert graph_cache.load_graph(entry.name, loaders) is None


def test_off_or_unwritable_the_export_still_works(tmp_path, monkeypatch, traces):
    monkeypatch.setenv("WANRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")
    export(ramped(0), tmp_path / "off")
    assert not (tmp_path / "cache").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WANRT_CACHE_DIR", str(blocker))
    monkeypatch.delenv("WANRT_GRAPH_CACHE")
    got = export(ramped(0), tmp_path / "unwritable")
    assert digests(got.parent) == digests(tmp_path / "off")


def test_a_dit_and_a_text_encoder_of_another_model_from_the_cache_equal_fresh_exports(cache, traces, tmp_path, monkeypatch):
    """The real exporters: the i2v DiT (image branch, RoPE tables folded from the config) and the umt5 encoder
    (its relative-position bucket table is a loader-given tensor)."""
    models = [resolve_model(make_tiny_model(tmp_path / f"m{seed}", "wan2.1", "i2v", seed=seed)) for seed in (1, 2)]
    for i, m in enumerate(models):
        export_dit_onnx(m.experts[0].view, tmp_path / f"dit{i}", cfg=m.dit, progress=False)
        export_text_encoder_onnx(m.text_encoder, tmp_path / f"t5{i}", task="i2v", progress=False)
    assert len(traces) == 2  # the second model's graphs came from the cache
    monkeypatch.setenv("WANRT_GRAPH_CACHE", "0")
    export_dit_onnx(models[1].experts[0].view, tmp_path / "dit_fresh", cfg=models[1].dit, progress=False)
    export_text_encoder_onnx(models[1].text_encoder, tmp_path / "t5_fresh", task="i2v", progress=False)
    assert digests(tmp_path / "dit1") == digests(tmp_path / "dit_fresh")
    assert digests(tmp_path / "t51") == digests(tmp_path / "t5_fresh")
    assert digests(tmp_path / "dit1") != digests(tmp_path / "dit0")  # the weights differ
