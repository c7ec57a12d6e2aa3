"""What the calibration tests share: tiny-DiT ORT sessions, the ONNX Q/DQ math in torch, error measures.

`fake_quant` is the ONNX QuantizeLinear -> DequantizeLinear math written from the spec
(y = saturate(round_half_even(x / scale)) * scale, fp8 e4m3 saturating to +-448), not our code's.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.calibration.w8a8_checks import cosine, fake_quant, initializers, rel_l2, session  # noqa: F401 (re-exported)
from tests.export.models.dit_cases import make_inputs
from wanrt.export.models.wan_dit import load_dit

BLOCK_LINEARS = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}


def is_block_linear(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "blocks" and ".".join(parts[2:]) in BLOCK_LINEARS


def feeds(case, batch, grid, seed) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in make_inputs(case, batch, grid, seed).items()}


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
