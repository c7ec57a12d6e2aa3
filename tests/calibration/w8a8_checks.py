"""Checks the W8A8 variant tests share: a torch fake-quantized twin of a Q/DQ graph, held-out DiT inputs, error measures.

The torch twin is built from the graph alone (its weight codes, per-channel scales and activation
input scales, read back from its initializers) and our torch module of the variant (itself tested
against diffusers): every quantized MatMul's linear gets weight = codes * scale and its input
passes through QuantizeLinear -> DequantizeLinear as the ONNX spec defines them (round half to
even, int8 saturating to [-128, 127], fp8 e4m3 saturating to +-448), zero point 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from wanrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions

WEIGHT_SCALE, INPUT_SCALE = "_scale", ".input_scale"


def initializers(graph: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(graph), load_external_data=False)
    return {t.name: numpy_helper.to_array(t, base_dir=str(graph.parent)) for t in model.graph.initializer}


def quantized_layers(graph: Path) -> list[str]:
    """The layers whose weight a DequantizeLinear feeds into a MatMul (read from the graph's nodes)."""
    model = onnx.load(str(graph), load_external_data=False)
    users = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    return [n.input[0].removesuffix(".weight") for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight") and n.output[0] in users]  # fmt: skip


def session(graph: Path, level: str = "all", optimized: Path | None = None) -> ort.InferenceSession:
    """ORT on the CPU; "basic" keeps each node's own math (from "extended" on ORT rewrites int8 weight DQ + MatMul)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]  # fmt: skip
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])


def fake_quant(x: torch.Tensor, scale: float, scheme: str) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear, zero point 0."""
    y = x / scale
    if scheme == "int8":
        return torch.clamp(torch.round(y), -128, 127) * scale
    return y.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale


class InputQuantizer:
    """A quantized linear's forward pre-hook: its input through ONNX Q -> DQ; with `forced` set, the graph's own
    dequantized input instead (the twin's own input is then kept in `seen`)."""

    def __init__(self, scale: float, scheme: str) -> None:
        self.scale, self.scheme = scale, scheme
        self.forced: np.ndarray | None = None
        self.seen: list[torch.Tensor] = []

    def __call__(self, _module, args):
        x = args[0]
        if self.forced is None:
            return (fake_quant(x, self.scale, self.scheme),)
        self.seen.append(x.detach().clone())
        return (torch.from_numpy(self.forced).reshape(x.shape),)


def fake_quantize_module(module: torch.nn.Module, graph: Path, scheme: str) -> torch.nn.Module:
    """`module` (the fp32 torch DiT) with the graph's dequantized weights and fake-quantized inputs in every quantized
    linear (each linear's hook is its `input_quantizer`)."""
    inits = initializers(graph)
    layers = quantized_layers(graph)
    assert layers
    for layer in layers:
        linear = module.get_submodule(layer)
        codes, scale = inits[f"{layer}.weight"].astype(np.float32), inits[f"{layer}.weight{WEIGHT_SCALE}"].astype(np.float32)
        linear.weight.data = torch.from_numpy((codes * scale[None, :]).T.copy())  # B [K, N] -> weight [N, K]
        linear.input_quantizer = InputQuantizer(float(inits[f"{layer}{INPUT_SCALE}"]), scheme)
        linear.register_forward_pre_hook(linear.input_quantizer)
    return module


@dataclass
class Taps:
    """One ORT run of a Q/DQ graph (node semantics kept), with each quantized linear's tensors read as extra outputs."""

    inputs: dict[str, np.ndarray]  # layer -> x, the input of its activation QuantizeLinear
    dequantized: dict[str, np.ndarray]  # layer -> its activation DequantizeLinear's output (codes * scale)
    products: dict[str, np.ndarray]  # layer -> its MatMul's output
    output: np.ndarray  # the graph's first output


def tap_graph(graph: Path, feeds: Mapping[str, np.ndarray]) -> Taps:
    """Run `graph` with every quantized MatMul's activation input, dequantized input and output tapped."""
    model = onnx.load(str(graph), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    taps: dict[str, tuple[str, str, str]] = {}  # layer -> (x, DQ(Q(x)), MatMul output)
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in producer or producer[n.input[1]].op_type != "DequantizeLinear":
            continue
        dq_a = producer.get(n.input[0])
        assert dq_a is not None and dq_a.op_type == "DequantizeLinear", n.name
        q = producer[dq_a.input[0]]
        assert q.op_type == "QuantizeLinear", n.name
        taps[producer[n.input[1]].input[0].removesuffix(".weight")] = (q.input[0], n.input[0], n.output[0])
    first = model.graph.output[0].name
    for names in taps.values():
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names)
    tapped = graph.with_name("taps.onnx")
    onnx.save(model, str(tapped))
    try:
        s = session(tapped, "basic")
        values = dict(zip([o.name for o in s.get_outputs()], s.run(None, dict(feeds))))
    finally:
        tapped.unlink()
    pick = lambda i: {layer: values[names[i]] for layer, names in taps.items()}  # noqa: E731
    return Taps(pick(0), pick(1), pick(2), values[first])


def teacher_forced_layers(graph: Path, feeds: Mapping[str, np.ndarray], scheme: str, taps: Taps | None = None) -> dict[str, float]:
    """Per quantized linear: rel L2 of the graph's MatMul output against fake_quant(x) @ (codes * scale) in torch,
    x being the graph's own input to that linear's QuantizeLinear."""
    taps = taps or tap_graph(graph, feeds)
    inits = initializers(graph)
    errors = {}
    for layer, x in taps.inputs.items():
        w = inits[f"{layer}.weight"].astype(np.float32) * inits[f"{layer}.weight{WEIGHT_SCALE}"].astype(np.float32)[None, :]
        xq = fake_quant(torch.from_numpy(x), float(inits[f"{layer}{INPUT_SCALE}"]), scheme)
        errors[layer] = rel_l2(taps.products[layer], (xq @ torch.from_numpy(w)).numpy())
    return errors


# With the activation codes aligned (code_aligned_run), the twin's own input to a quantized linear may differ from the
# graph's by float32 noise only (ORT and torch order their sums differently: about 1e-7 relative per op, grown by the
# blocks before it), and its own rounding of that input may give another code only where the value sits at a rounding
# boundary: a handful per million codes.
INPUT_DRIFT = 1e-4
FLIP_FRACTION = 1e-3


@dataclass
class AlignedRun:
    """The twin's run with every quantized linear fed the graph's own dequantized input."""

    output: np.ndarray
    input_drift: dict[str, float]  # layer -> rel L2 of the twin's own input to the linear against the graph's
    flips: int  # activation codes the twin's own rounding gives differently from the graph's
    codes: int  # activation codes in all


def code_aligned_run(module: torch.nn.Module, names: list[str], feeds: Mapping[str, np.ndarray], taps: Taps) -> AlignedRun:
    """Run the fake-quantized twin with each linear's activation codes taken from the graph, so that a code flipped at
    a rounding boundary by float32 noise is not carried into every later linear; what the twin would have rounded
    on its own is compared code by code."""
    quantizers = {layer: module.get_submodule(layer).input_quantizer for layer in taps.inputs}
    for layer, q in quantizers.items():
        q.forced, q.seen = taps.dequantized[layer], []
    try:
        output = torch_run(module, names, feeds)
    finally:
        for q in quantizers.values():
            q.forced = None
    drift, flips, codes = {}, 0, 0
    for layer, q in quantizers.items():
        assert len(q.seen) == 1, (layer, len(q.seen))  # each quantized linear runs once per DiT call
        own = q.seen[0].numpy()
        drift[layer] = rel_l2(own, taps.inputs[layer])
        rounded = fake_quant(q.seen[0], q.scale, q.scheme).numpy()
        flips += int((rounded != taps.dequantized[layer]).sum())
        codes += rounded.size
    return AlignedRun(output, drift, flips, codes)


@dataclass
class TwinAgreement:
    """How one DiT call of a Q/DQ graph agrees with its fake-quantized torch twin."""

    layers: dict[str, float]  # per quantized linear, fed the graph's own input (teacher_forced_layers)
    aligned: float  # whole output, rel L2, with the activation codes aligned (code_aligned_run)
    drift: float  # the largest input drift of a linear in that run
    flips: int
    codes: int
    unaligned: float  # whole output, rel L2, the twin rounding on its own

    def describe(self) -> str:
        return (f"graph vs torch fake-quant, per linear max {max(self.layers.values()):.1e}; whole DiT {self.aligned:.1e}"
                f" with codes aligned (input drift max {self.drift:.1e}, {self.flips} of {self.codes} codes flipped),"
                f" {self.unaligned:.1e} rounding on its own")


def twin_agreement(graph: Path, module: torch.nn.Module, feeds: Mapping[str, np.ndarray], scheme: str) -> TwinAgreement:
    """Compare `graph` (ORT, node semantics kept) with `module` (fake_quantize_module of it) on one DiT call."""
    names = [i.name for i in session(graph, "basic").get_inputs()]
    taps = tap_graph(graph, feeds)
    aligned = code_aligned_run(module, names, feeds, taps)
    return TwinAgreement(
        teacher_forced_layers(graph, feeds, scheme, taps), rel_l2(taps.output, aligned.output),
        max(aligned.input_drift.values()), aligned.flips, aligned.codes, rel_l2(taps.output, torch_run(module, names, feeds)),
    )  # fmt: skip


def torch_run(module: torch.nn.Module, names: list[str], feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names)).numpy()


class FeedRecorder(OnnxRuntimeBackend):
    """The real ORT CPU backend, keeping a copy of every feed the named components are run with."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(OrtOptions(device="cpu"))
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names}

    def load(self, component, bundle_dir, **kw):
        engine = super().load(component, bundle_dir, **kw)
        if component.name in self.feeds:
            run, calls = engine._run, self.feeds[component.name]

            def recording(feeds):
                calls.append({k: np.array(v) for k, v in feeds.items()})
                return run(feeds)

            engine._run = recording
        return engine


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref.max() - ref.min()) ** 2 / np.mean((x.astype(np.float64) - ref) ** 2)))
