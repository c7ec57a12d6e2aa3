"""What the calibration tests share: tiny-DiT ORT sessions, the ONNX Q/DQ math in torch, error measures.

`fake_quant` is the ONNX QuantizeLinear -> DequantizeLinear math written from the spec
(y = saturate(round_half_even(x / scale)) * scale, fp8 e4m3 saturating to +-448), not our code's.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from tests.export.models.dit_cases import make_inputs
from wanrt.export.models.wan_dit import load_dit

BLOCK_LINEARS = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}


def is_block_linear(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "blocks" and ".".join(parts[2:]) in BLOCK_LINEARS


def initializers(graph) -> dict[str, np.ndarray]:
    model = onnx.load(str(graph), load_external_data=False)
    return {t.name: numpy_helper.to_array(t, base_dir=str(graph.parent)) for t in model.graph.initializer}


def feeds(case, batch, grid, seed) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in make_inputs(case, batch, grid, seed).items()}


def session(path, optimized=None, level: str = "all") -> ort.InferenceSession:
    """An ORT CPU session; level "basic" keeps each node's own semantics (from "extended" on, ORT fuses an int8
    weight DQ + MatMul into MatMulNBits, which quantizes the activations on the fly: not the graph's math)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]  # fmt: skip
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fake_quant(x: torch.Tensor, scale: float, scheme: str) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear, zero point 0 (round half to even; fp8 saturates)."""
    y = x / scale
    if scheme == "int8":
        return torch.clamp(torch.round(y), -128, 127) * scale
    return y.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale


def fake_quantized_module(view, cfg, graph, scheme: str, act_scales: dict[str, float] | None):
    """Our WanDiT with the graph's weight codes * scales in every block linear, inputs fake-quantized."""
    inits = initializers(graph)
    module = load_dit(view, cfg)
    for name, linear in module.named_modules():
        if not is_block_linear(name):
            continue
        codes = inits[f"{name}.weight"].astype(np.float32)  # [K, N]
        scale = inits[f"{name}.weight_scale"].astype(np.float32)  # [N]
        linear.weight.data = torch.from_numpy((codes * scale[None, :]).T.copy())
        if act_scales is not None:
            s = act_scales[name]
            linear.register_forward_pre_hook(lambda _m, args, s=s: (fake_quant(args[0], s, scheme),))
    return module


def torch_run(module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(inputs[k]) for k in ("latent", "timestep", "context", "clip_fea"))).numpy()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def observed_amax(calib_graph, outputs: dict[str, list[str]], case, seeds) -> dict[str, float]:
    """{key: max over `seeds` of the graph's amax outputs} of a `with_amax_outputs` graph, batch 2 on a 3x6x10 latent."""
    s = session(calib_graph, level="basic")
    names = [o.name for o in s.get_outputs()]
    amax: dict[str, float] = {}
    for seed in seeds:
        values = dict(zip(names, s.run(None, feeds(case, 2, (3, 6, 10), seed))))
        for out, keys in outputs.items():
            for key in keys:
                amax[key] = max(amax.get(key, 0.0), float(values[out]))
    return amax
