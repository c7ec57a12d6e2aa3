"""The ONNX node our TensorRT attention plugin implements (the export-side seam).

Node (one per attention call):

    wanrt::WanAttention(q, k, v) -> out
      q    [B, heads, Sq, head_dim]   float32 or bfloat16
      k, v [B, heads, Sk, head_dim]   same dtype as q
      out  [B, heads, Sq, head_dim]   same dtype as q; out = softmax(scale * q @ k^T) @ v,
           no mask, no causality, softmax accumulated in float32.
    domain  "wanrt" (opset version 1)
    attributes
      scale            float   softmax scale (1/sqrt(head_dim) for Wan); q is NOT pre-scaled
      plugin_version   string  "1"      } how onnx-tensorrt's FallbackPluginImporter finds the
      plugin_namespace string  "wanrt"  } IPluginV3 creator: name = op_type, these two attrs

TensorRT's ONNX parser turns any node it does not know into a plugin lookup by
(op_type, plugin_version, plugin_namespace) and passes the remaining attributes (`scale`) as
PluginFields, so the plugin (a later issue) registers creator "WanAttention" version "1" in
namespace "wanrt".  ONNX Runtime cannot run this node; graphs that contain it are for
TensorRT only.

In torch the op is `torch.ops.wanrt.attention(q, k, v, scale)` (`torch_op()`); its eager
implementation is the reference math, so a module built with `attention="plugin"` still runs
(and traces) in torch.  This module imports torch only when that op is used, so the lint and
the runtime can name the plugin node without torch.
"""

from __future__ import annotations

from functools import lru_cache

DOMAIN = "wanrt"
OP_TYPE = "WanAttention"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "wanrt"
ATTRIBUTES = ("scale", "plugin_version", "plugin_namespace")


@lru_cache(maxsize=None)
def torch_op():
    """`torch.ops.wanrt.attention(q, k, v, scale)`, registered on first use (torch imported lazily).

    Its eager implementation is the reference math, softmax(scale * q @ k^T) @ v over the last
    two dims (accumulated in float32); under tracing it is one opaque node.
    """
    import torch

    @torch.library.custom_op("wanrt::attention", mutates_args=(), schema="(Tensor q, Tensor k, Tensor v, float scale) -> Tensor")
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
        return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)

    @attention.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)

    return attention


def plugin_attention(q, k, v, scale: float):
    """Call the plugin op (eager: reference math; traced: one `wanrt::attention` node)."""
    return torch_op()(q, k, v, scale)


def op_schema():
    """The `onnx.defs.OpSchema` of the node (what onnxscript needs to emit it)."""
    from onnx.defs import OpSchema

    return OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        __doc__ or "",
        inputs=[OpSchema.FormalParameter(n, "T") for n in ("q", "k", "v")],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(bfloat16)", "tensor(float16)"], "q/k/v/out dtype")],
        attributes=[
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
        ],
    )


def onnx_translations() -> dict:
    """`custom_translation_table` entries that turn `wanrt::attention` into the plugin node."""
    from onnxscript.values import Op, Opset

    wan_attention_op = Op(Opset(DOMAIN, OPSET_VERSION), OP_TYPE, op_schema())

    def wan_attention(q, k, v, scale: float):
        return wan_attention_op(
            q, k, v, scale=scale, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE
        )

    import torch

    torch_op()
    return {torch.ops.wanrt.attention.default: wan_attention}


def is_plugin_node(domain: str, op_type: str) -> bool:
    """True for a node of our plugin op (the only custom op our graphs may hold)."""
    return domain == DOMAIN and op_type == OP_TYPE
