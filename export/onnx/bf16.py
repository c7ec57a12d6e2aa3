"""A bf16 graph rewritten to run where bf16 kernels are missing (ONNX Runtime on CPU)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .component import ExportError


def bf16_as_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bf16 graph that runs where bf16 kernels are missing (ONNX Runtime on CPU).

    bf16 initializers become float32 holding the same values, and every `Cast(to=bfloat16)`
    is followed by a Cast back to float32, so each tensor the graph rounds to bf16 is still
    rounded; only the outputs of bf16 ops themselves are not rounded (their arithmetic runs in
    float32, as a GPU's bf16 GEMM accumulates).  `model` must hold its weights (external data
    loaded).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.BFLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        nodes.append(node)
        to = next((a for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to is not None and to.i == onnx.TensorProto.BFLOAT16:
            rounded = node.output[0] + "__bf16"
            back = onnx.helper.make_node("Cast", [rounded], [node.output[0]], to=onnx.TensorProto.FLOAT,
                                         name=node.name + "__to_fp32")
            node.output[0] = rounded
            nodes.append(back)
        elif any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == onnx.TensorProto.BFLOAT16 for a in node.attribute):
            raise ExportError(f"node {node.name}: bf16 tensor attribute ({node.op_type}) is not handled")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return out
