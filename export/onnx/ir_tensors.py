"""Torch tensors as onnx_ir tensors: sharing memory (`torch_to_ir_tensor`), or read lazily from a loader when the
graph is written (`attach_lazy_weights`), each load checked against the dtype and shape the graph expects."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import ml_dtypes
import onnx_ir as ir
import torch

from .component import ExportError

# Lazily loaded weights up to this size are kept once read (biases, norms); larger ones are not.
CACHE_BYTES = 1 << 20

# torch dtype -> numpy dtype used to hand a tensor's bytes to onnx_ir (bf16/fp8 via ml_dtypes).
_NUMPY_VIEW = {
    torch.bfloat16: (torch.uint16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
}


def torch_to_ir_tensor(t: torch.Tensor, name: str | None = None) -> ir.Tensor:
    """An onnx_ir tensor holding `t`'s values (bf16/fp8 through ml_dtypes), sharing memory."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _NUMPY_VIEW:
        int_type, np_type = _NUMPY_VIEW[t.dtype]
        arr = t.view(int_type).numpy().view(np_type)
    else:
        arr = t.numpy()
    return ir.Tensor(arr, name=name)


def attach_lazy_weights(model: ir.Model, weights: Mapping[str, Callable[[], torch.Tensor]]) -> None:
    """Make each named initializer a lazy tensor read from its loader when written."""
    inits = model.graph.initializers
    for name, load in weights.items():
        value = inits.get(name)
        if value is None:
            continue  # a parameter the graph does not use (e.g. CLIP's unused head)
        small = math.prod(value.shape.numpy()) * value.dtype.itemsize <= CACHE_BYTES
        value.const_value = ir.LazyTensor(
            _checked_loader(name, load, value.dtype, value.shape), dtype=value.dtype, shape=value.shape, name=name,
            cache=small,  # the optimizer reads small tensors more than once; large ones are read once, when written
        )


def _checked_loader(name: str, load: Callable[[], torch.Tensor], dtype: ir.DataType, shape: ir.Shape) -> Callable[[], ir.Tensor]:
    def loader() -> ir.Tensor:
        tensor = torch_to_ir_tensor(load(), name)
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ExportError(
                f"weight {name!r}: loaded {tensor.dtype.name} {list(tensor.shape)}, "
                f"the graph expects {dtype.name} {list(shape)}"
            )
        return tensor

    return loader
