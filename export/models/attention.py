"""The one attention function every exported module calls, with its ONNX implementations.

`native`: explicit MatMul -> Softmax -> MatMul with the softmax scale folded into Q before the
first MatMul; the pattern TensorRT's Myelin fuses into one attention kernel (docs "Fused
Attention", method 2) and that every TensorRT 10.x ONNX parser and ONNX Runtime accept.
No casts inside the pattern: with bfloat16 q/k/v the softmax is a bfloat16 op (fused kernels
and torch's CPU kernel accumulate it in float32).

`plugin`: one `wanrt::WanAttention` node (see `plugins_trt.onnx_op`) for our TensorRT plugin;
exported graphs holding it run in TensorRT only.
"""

from __future__ import annotations

import math

import torch

from wanrt.engines.errors import WanrtError
from wanrt.plugins_trt.onnx_op import plugin_attention

ATTENTION_IMPLS = ("native", "plugin")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "native") -> torch.Tensor:
    """softmax(q @ k^T / sqrt(head_dim)) @ v on [B, heads, S, head_dim] tensors, no mask."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "native":
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
        return torch.matmul(scores.softmax(dim=-1), v)
    if impl == "plugin":
        return plugin_attention(q, k, v, scale)
    raise WanrtError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
