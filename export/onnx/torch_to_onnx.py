"""Export a torch module to ONNX with an engine signature's names and dynamic dims.

`export_onnx` is the one way every component reaches ONNX:

1. check the example inputs against the signature (`EngineSignature.check_inputs`);
2. trace with `torch.onnx.export(dynamo=True)`; each string dim of the signature becomes a
   `torch.export.Dim` with the signature's range (or a derived dim the caller supplies);
3. optionally replace the initializers by lazy loaders (`weights=`), so a module traced on the
   `meta` device is exported without ever holding its weights: each tensor is read, written to
   the external data file and dropped, one at a time;
4. fold constants, but never fold (copy, transpose or rename) a weight: initializer names stay
   the module's state_dict names, and no second copy of a weight is made;
5. name the graph's inputs/outputs and their dynamic dims exactly as the signature does, then
   run the caller's graph passes (`passes=`: Q/DQ insertion, plugin nodes, ...);
6. write `out_dir/model.onnx` plus ONE external data file `model.onnx.data` (`component.staged_graph`).

The exporter's own messages that tell the user nothing are silenced while it traces
(`quiet_exporter_noise`); every other warning still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from tqdm import tqdm

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import EngineSignature, InputMismatch
from wanrt.plugins_trt.onnx_op import onnx_translations

from . import graph_cache
from .component import GRAPH_FILE, ExportedComponent, ExportError, data_file, staged_graph
from .ir_tensors import attach_lazy_weights

MIN_OPSET = 19
# Initializers up to this size stay inside model.onnx: shape/axes constants must be readable
# there for shape inference and for TensorRT ("axes must be an initializer").
SMALL_TENSOR_BYTES = 1024

# What torch.onnx.export prints on every export that tells the user nothing, matched exactly (all else still shows).
QUIET_LOG_MESSAGES: dict[str, tuple[str, ...]] = {  # logger -> unformatted messages
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed. Skipping %s",),
}
QUIET_WARNINGS: tuple[tuple[type[Warning], str], ...] = (  # (category, message regex)
    # the signature's dim names are set on the graph afterwards (`name_io_dims`)
    (UserWarning, r"# The axis name: .+ will not be used, since it shares the same shape constraints with another axis: "),
    # torch.export's own pytree pickling (copyreg), nothing the caller can change
    (FutureWarning, re.escape("`isinstance(treespec, LeafSpec)` is deprecated")),
)

# Graph metadata torch.export writes in hash order (its symbols' ranges, a dict printed as it iterates), so that
# the same export differs from process to process; the signature's dim_ranges say what it says.
UNSTABLE_GRAPH_METADATA = ("pkg.torch.export.ExportedProgram.range_constraints",)

GraphPass = Callable[[ir.Model], None]  # rewrites a traced graph in place before it is written

def export_onnx(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    signature: EngineSignature,
    opset: int = MIN_OPSET,
    *,
    dynamic_dims: Mapping[str, Any] | None = None,
    weights: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    passes: Sequence[GraphPass] = (),
    progress: bool = True,
    cache_as: Mapping[str, Any] | None = None,
) -> ExportedComponent:
    """Export `module` to `out_dir/model.onnx` (+ `model.onnx.data`); return what was written.

    `module.forward` takes the inputs positionally in signature order.  `dynamic_dims` maps a
    signature dim name to the `torch.export.Dim` (or derived dim, e.g. `2 * Dim("h2")`) to trace
    it with; by default `Dim(name, min, max)` from `signature.dim_ranges`.  `weights` maps
    initializer (parameter) names to loaders called once each while the data file is written;
    every initializer of a module traced on `meta` must have one.  `passes` run in order on the
    optimized graph, its I/O already named as the signature says.  `cache_as`: the exporter's
    description of the module's architecture (its config and options); with it the optimized graph
    comes from the traced-graph cache when it holds one (`graph_cache`), else it is traced and stored.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; expected {MIN_OPSET} or newer")
    args = _ordered_inputs(example_inputs, signature)
    state = module.state_dict(keep_vars=True)
    # The weights: the state dict and every tensor given a loader (a non-persistent buffer derived from the
    # weights, e.g. Animate's motion basis); never folded, never taken from the traced-graph cache.
    loaders = {name: (lambda t=t: t.detach()) for name, t in state.items()} | dict(weights or {})
    key = graph_cache.graph_key(cache_as, module, signature, opset, dynamic_dims) if (
        cache_as is not None and graph_cache.cache_enabled()) else None  # fmt: skip
    model = graph_cache.load_graph(key, loaders) if key is not None else None
    try:
        if model is None:
            model = traced_and_optimized(module, args, signature, opset, dynamic_dims, weights, keep=set(loaders))
            if key is not None:
                graph_cache.store_graph(key, model, set(loaders))  # a failure there costs only the next trace
        for graph_pass in passes:
            graph_pass(model)
        return ExportedComponent(save_with_external_data(model, out_dir, progress=progress), signature)
    except Exception as e:  # a weight loader's error arrives wrapped in the optimizer's PassError
        raise _first_wanrt_error(e) or e


def traced_and_optimized(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    signature: EngineSignature,
    opset: int,
    dynamic_dims: Mapping[str, Any] | None,
    weights: Mapping[str, Callable[[], torch.Tensor]] | None,
    keep: set[str],
) -> ir.Model:
    """Trace `module`, attach its lazy `weights`, fold constants (the initializers in `keep` untouched) and name
    the I/O dims."""
    model = trace_to_onnx_ir(module, args, signature, opset, dynamic_dims)
    if weights is not None:
        attach_lazy_weights(model, weights)
    _require_initializer_data(model)
    optimize_keep_initializers(model, keep=keep)
    name_io_dims(model, signature)
    return model


def _first_wanrt_error(e: BaseException | None) -> WanrtError | None:
    """The first WanrtError in an exception's cause/context chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, WanrtError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _ordered_inputs(example_inputs: Mapping[str, torch.Tensor], signature: EngineSignature) -> tuple[torch.Tensor, ...]:
    """The example tensors in signature order, checked against the signature (names, dtypes, dims, ranges)."""
    try:
        signature.check_inputs({n: (t.shape, str(t.dtype).removeprefix("torch.")) for n, t in example_inputs.items()})
    except InputMismatch as e:
        raise ExportError(f"example {e}") from None
    return tuple(example_inputs[n] for n in signature.input_names)


def _dynamic_shapes(signature: EngineSignature, dynamic_dims: Mapping[str, Any] | None) -> tuple[dict[int, Any], ...]:
    """`torch.export` dynamic_shapes for the signature's inputs, one Dim object per dim name."""
    dims: dict[str, Any] = dict(dynamic_dims or {})
    unknown = set(dims) - {d for s in signature.inputs for d in s.shape if isinstance(d, str)}
    if unknown:
        raise ExportError(f"dynamic_dims names {sorted(unknown)} that no signature input declares")
    shapes = []
    for spec in signature.inputs:
        axes = {}
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str):
                if d not in dims:
                    if d not in signature.dim_ranges:
                        raise ExportError(f"signature dim {d!r} of {spec.name} has no range in dim_ranges")
                    lo, hi = signature.dim_ranges[d]
                    dims[d] = torch.export.Dim(d, min=lo, max=hi)
                axes[axis] = dims[d]
        shapes.append(axes)
    return tuple(shapes)


def trace_to_onnx_ir(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    signature: EngineSignature,
    opset: int,
    dynamic_dims: Mapping[str, Any] | None = None,
) -> ir.Model:
    """The unoptimized ONNX IR of `module(*args)` with the signature's I/O names."""
    module = module.eval()
    # The fake-tensor dispatch cache costs more than it saves on graphs with symbolic shapes.
    with torch.no_grad(), quiet_exporter_noise(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        try:
            program = torch.onnx.export(
                module,
                args,
                input_names=signature.input_names,
                output_names=signature.output_names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(signature, dynamic_dims),
                optimize=False,
                verbose=False,
                custom_translation_table=onnx_translations(),
            )
        except Exception as e:  # torch.export errors are long; keep the head of the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export of {type(module).__name__} failed: {first}") from e
    model = program.model
    for key in UNSTABLE_GRAPH_METADATA:
        model.graph.metadata_props.pop(key, None)
    got = [v.name for v in model.graph.outputs]
    if got != signature.output_names:
        raise ExportError(f"{type(module).__name__} produced outputs {got}; expected {signature.output_names}")
    return model


@contextmanager
def quiet_exporter_noise() -> Iterator[None]:
    """Silence `QUIET_LOG_MESSAGES` and `QUIET_WARNINGS` (and nothing else) while the block runs."""
    filters = [
        (logging.getLogger(name), lambda record, quiet=messages: record.msg not in quiet)
        for name, messages in QUIET_LOG_MESSAGES.items()
    ]
    with warnings.catch_warnings():
        for category, message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger, drop in filters:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in filters:
                logger.removeFilter(drop)


def _require_initializer_data(model: ir.Model) -> None:
    """Every initializer must have real data (not a meta/fake tensor)."""
    from torch._subclasses.fake_tensor import FakeTensor

    missing = []
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if value.const_value is None or (isinstance(raw, torch.Tensor) and (raw.is_meta or isinstance(raw, FakeTensor))):
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ExportError(f"no weight data for initializers {missing[:5]}{more} (traced on meta without weights=)")


def optimize_keep_initializers(model: ir.Model, keep: set[str]) -> None:
    """Fold constants and clean up, leaving the initializers named in `keep` (the weights) untouched.

    No node reading a kept initializer is folded, so no weight is copied, transposed or renamed.
    """
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    inits = model.graph.initializers
    kept = {id(inits[n]) for n in keep if n in inits}

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(id(v) in kept for v in node.inputs if v is not None) else None

    ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=should_fold,
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def name_io_dims(model: ir.Model, signature: EngineSignature) -> None:
    """Give the graph inputs/outputs exactly the signature's dims (named dynamic, fixed static)."""
    graph = model.graph
    for values, specs in ((graph.inputs, signature.inputs), (graph.outputs, signature.outputs)):
        if [v.name for v in values] != [s.name for s in specs]:
            raise ExportError(f"graph I/O {[v.name for v in values]} differ from the signature {[s.name for s in specs]}")
        for value, spec in zip(values, specs):
            if value.shape is not None and len(value.shape) != len(spec.shape):
                raise ExportError(f"{spec.name}: graph rank {len(value.shape)}, signature {list(spec.shape)}")
            if value.shape is not None:
                for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
                    if isinstance(want, int) and isinstance(got, int) and got != want:
                        raise ExportError(f"{spec.name}: graph shape {list(value.shape)}, signature {list(spec.shape)}")
                    if isinstance(want, str) and isinstance(got, int):
                        raise ExportError(
                            f"{spec.name}: dim {axis} is fixed at {got} in the traced graph (shape {list(value.shape)}), "
                            f"but the signature declares it dynamic {want!r}; the module specializes on that size"
                        )
            want_dtype = ir.DataType.from_numpy(np.dtype(spec.dtype))
            if value.dtype is not None and value.dtype != want_dtype:
                raise ExportError(f"{spec.name}: graph dtype {value.dtype.name}, signature {spec.dtype}")
            value.shape = ir.Shape(list(spec.shape))
            value.dtype = want_dtype


def save_with_external_data(model: ir.Model, out_dir: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Write `out_dir/model.onnx` and its one data file (through `staged_graph`); return both paths."""
    graph = Path(out_dir) / GRAPH_FILE
    externals = sum(1 for v in model.graph.initializers.values() if v.const_value.nbytes > SMALL_TENSOR_BYTES)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    with staged_graph(out_dir, weights) as tmp, tqdm(total=externals, desc=f"writing {GRAPH_FILE}", unit="tensor",
                                            file=sys.stderr, disable=not progress) as bar:  # fmt: skip
        ir.save(
            model,
            tmp / GRAPH_FILE,
            external_data=data_file(graph).name,
            size_threshold_bytes=SMALL_TENSOR_BYTES,  # the tensors over it go to the data file, one callback each
            callback=lambda _t, _info: bar.update(),
            max_workers=1,
            max_in_flight_bytes=256 << 20,
        )
    return [graph, data_file(graph)]
