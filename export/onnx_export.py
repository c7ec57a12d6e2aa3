"""Export a torch module to ONNX with an engine signature's names and dynamic dims.

`export_onnx` is the one way every component reaches ONNX:

1. trace with `torch.onnx.export(dynamo=True)`; each string dim of the signature becomes a
   `torch.export.Dim` with the signature's range (or a derived dim the caller supplies);
2. name the graph's inputs/outputs and their dynamic dims exactly as the signature does;
3. optionally replace the initializers by lazy loaders (`weights=`), so a module traced on the
   `meta` device is exported without ever holding its weights: each tensor is read, written to
   the external data file and dropped, one at a time;
4. fold constants, but never fold (copy, transpose or rename) a weight: initializer names stay
   the module's state_dict names, and no second copy of a weight is made;
5. write `model.onnx` plus ONE external data file `model.onnx.data` into a temporary folder
   beside the destination, then rename both into place.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from tqdm import tqdm

from wanrt.engines.errors import WanrtError
from wanrt.engines.model import DiTConfig
from wanrt.engines.signatures import EngineSignature, InputMismatch
from wanrt.plugins_trt.onnx_op import onnx_translations

MIN_OPSET = 19
# Initializers up to this size stay inside model.onnx: shape/axes constants must be readable
# there for shape inference and for TensorRT ("axes must be an initializer").
SMALL_TENSOR_BYTES = 1024
# Lazily loaded weights up to this size are kept once read (biases, norms); larger ones are not.
CACHE_BYTES = 1 << 20

# torch dtype -> numpy dtype used to hand a tensor's bytes to onnx_ir (bf16/fp8 via ml_dtypes).
_NUMPY_VIEW = {
    torch.bfloat16: (torch.uint16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
}


class ExportError(WanrtError):
    """A module could not be exported, or its inputs do not fit the signature."""


def export_onnx(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    onnx_path: Path,
    signature: EngineSignature,
    opset: int = MIN_OPSET,
    *,
    dynamic_dims: Mapping[str, Any] | None = None,
    weights: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Export `module` to `onnx_path` (+ `onnx_path.name + ".data"`); return the files written.

    `module.forward` takes the inputs positionally in signature order.  `dynamic_dims` maps a
    signature dim name to the `torch.export.Dim` (or derived dim, e.g. `2 * Dim("h2")`) to trace
    it with; by default `Dim(name, min, max)` from `signature.dim_ranges`.  `weights` maps
    initializer (parameter) names to loaders called once each while the data file is written;
    every initializer of a module traced on `meta` must have one.
    """
    onnx_path = Path(onnx_path)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; expected {MIN_OPSET} or newer")
    args = _ordered_inputs(example_inputs, signature)
    model = trace_to_onnx_ir(module, args, signature, opset, dynamic_dims)
    if weights is not None:
        attach_lazy_weights(model, weights)
    _require_initializer_data(model)
    try:
        optimize_keep_initializers(model, keep=set(module.state_dict(keep_vars=True)))
        name_io_dims(model, signature)
        return save_with_external_data(model, onnx_path, progress=progress)
    except Exception as e:  # a weight loader's error arrives wrapped in the optimizer's PassError
        raise _first_wanrt_error(e) or e


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
    with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        warnings.simplefilter("ignore")
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
    got = [v.name for v in model.graph.outputs]
    if got != signature.output_names:
        raise ExportError(f"{type(module).__name__} produced outputs {got}; expected {signature.output_names}")
    return model


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
        t = load()
        tensor = torch_to_ir_tensor(t, name)
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ExportError(
                f"weight {name!r}: loaded {tensor.dtype.name} {list(tensor.shape)}, "
                f"the graph expects {dtype.name} {list(shape)}"
            )
        return tensor

    return loader


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


def save_with_external_data(model: ir.Model, onnx_path: Path, progress: bool = True) -> list[Path]:
    """Write `onnx_path` and its one data file through a temporary folder; return both paths."""
    onnx_path = Path(onnx_path)
    data_name = onnx_path.name + ".data"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{onnx_path.name}.", dir=onnx_path.parent))
    try:
        total = len(model.graph.initializers)
        with tqdm(total=total, desc=f"writing {onnx_path.name}", unit="tensor", file=sys.stderr, disable=not progress) as bar:
            ir.save(
                model,
                tmp / onnx_path.name,
                external_data=data_name,
                size_threshold_bytes=SMALL_TENSOR_BYTES,
                callback=lambda _t, _info: bar.update(),
                max_workers=1,
                max_in_flight_bytes=256 << 20,
            )
        (tmp / data_name).touch(exist_ok=True)  # a graph without weights still gets its (empty) data file
        os.replace(tmp / data_name, onnx_path.parent / data_name)
        os.replace(tmp / onnx_path.name, onnx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [onnx_path, onnx_path.parent / data_name]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_dit_onnx(
    view: Mapping,
    cfg: DiTConfig | None,
    out_dir: Path,
    precision: str = "fp32",
    attention: str = "native",
    *,
    per_frame_timestep: bool | None = None,
    opset: int = MIN_OPSET,
    progress: bool = True,
) -> list[Path]:
    """Export one DiT expert to `out_dir/model.onnx` + `model.onnx.data`; return the files.

    The module is traced on the `meta` device and each weight is read from `view` (official
    key -> ref; `view.load(key, dtype)` dequantizes fp8/int8) only while the data file is
    written, so the export never holds a copy of the model.  I/O is `dit_signature`, float32 in
    every precision; dynamic batch, latent frames, height and width (height/width in multiples
    of the patch size).  `precision="bf16"` stores and runs the big linears and attention in
    bf16 with float32 islands (see `export.models.wan_dit`).
    """
    from wanrt.export.models.wan_dit import WanDiT, check_view, param_dtype

    if precision not in PRECISIONS:
        raise ExportError(f"unsupported DiT precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if cfg is None:
        from wanrt.export.checkpoint.dit_config import infer_dit_config

        cfg = infer_dit_config({k: tuple(view[k].shape) for k in view}, where="DiT checkpoint")
    check_view(view, cfg)
    with torch.device("meta"):
        module = WanDiT(cfg, dtype, attention, per_frame_timestep)
    signature = module.signature
    weights = {name: _view_loader(view, name, param_dtype(name, dtype)) for name, _ in module.named_parameters()}
    return export_onnx(module, dit_example_inputs(signature), Path(out_dir) / "model.onnx", signature, opset,
                       dynamic_dims=dit_dynamic_dims(cfg, signature), weights=weights, progress=progress)


def _view_loader(view: Mapping, key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: view.load(key, dtype)


DIT_EXAMPLE_SIZES = {"batch": 2, "frames": 3, "height": 6, "width": 10}  # a 3x3x5-patch grid; batch 2 (not 1)


def dit_dynamic_dims(cfg: DiTConfig, signature: EngineSignature) -> dict[str, Any]:
    """Latent frames/height/width traced as multiples of the patch size (`2 * Dim("height_patches")`)."""
    dims: dict[str, Any] = {}
    for name, patch in zip(("frames", "height", "width"), cfg.patch_size):
        if patch > 1:
            lo, hi = signature.dim_ranges[name]
            dims[name] = patch * torch.export.Dim(f"{name}_patches", min=max(1, -(-lo // patch)), max=hi // patch)
    return dims


def dit_example_inputs(signature: EngineSignature, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """Zero example inputs of the DiT signature at `DIT_EXAMPLE_SIZES` (empty tensors on meta)."""
    return {
        spec.name: torch.zeros([DIT_EXAMPLE_SIZES[d] if isinstance(d, str) else d for d in spec.shape], device=device)
        for spec in signature.inputs
    }


def bf16_as_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bf16 graph that runs where bf16 kernels are missing (ONNX Runtime on CPU).

    bf16 initializers become float32 holding the same values, and every `Cast(to=bfloat16)`
    is followed by a Cast back to float32, so each tensor the graph rounds to bf16 is still
    rounded; only the outputs of bf16 ops themselves are not rounded (their arithmetic runs in
    float32, as a GPU's bf16 GEMM accumulates).  `model` must hold its weights (external data
    loaded).
    """
    from onnx import numpy_helper

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


_ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}  # TensorProto FLOAT, FLOAT16, BFLOAT16


def export_dit_onnx_like(template: Path, view: Mapping, cfg: DiTConfig, out_dir: Path, progress: bool = True) -> list[Path]:
    """Export another expert of the same architecture: `template`'s graph with `view`'s weights.

    Wan2.2 A14B's two experts share one graph and differ only in their weights, so the second
    need not be traced again.  Each external initializer named after an official key is read
    from `view` in the template's dtype and written at the template's offset; the others
    (constants folded from the config) are copied from the template's data file.  The result
    equals a fresh `export_dit_onnx` of `view` byte for byte.
    """
    import onnx

    from wanrt.export.models.wan_dit import check_view

    check_view(view, cfg)
    template = Path(template)
    model = onnx.load(str(template), load_external_data=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / template.name
    data_name = onnx_path.name + ".data"
    externals = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") != data_name:
                raise ExportError(f"{template}: initializer {init.name!r} lives in {info.get('location')!r}, expected {data_name!r}")
            externals.append((int(info.get("offset", 0)), int(info["length"]), init))
        elif init.name in view:  # a small weight stored inside model.onnx
            data = _weight_bytes(view, init, template)
            if not init.HasField("raw_data") or len(init.raw_data) != len(data):
                raise ExportError(f"{template}: inline weight {init.name!r} is not stored as {len(data)} raw bytes")
            init.raw_data = data
    tmp = Path(tempfile.mkdtemp(prefix=f".{onnx_path.name}.", dir=out_dir))
    try:
        with open(template.parent / data_name, "rb") as src, open(tmp / data_name, "wb") as dst:
            for offset, length, init in tqdm(sorted(externals, key=lambda e: e[0]), desc=f"writing {onnx_path.name}",
                                             unit="tensor", file=sys.stderr, disable=not progress):  # fmt: skip
                if init.name in view:
                    data = _weight_bytes(view, init, template)
                else:
                    src.seek(offset)
                    data = src.read(length)
                if len(data) != length:
                    raise ExportError(f"weight {init.name!r}: {len(data)} bytes, the template graph expects {length}")
                dst.seek(offset)
                dst.write(data)
            dst.truncate((template.parent / data_name).stat().st_size)
        onnx.save(model, str(tmp / onnx_path.name))
        os.replace(tmp / data_name, out_dir / data_name)
        os.replace(tmp / onnx_path.name, onnx_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [onnx_path, out_dir / data_name]


def _weight_bytes(view: Mapping, init, template: Path) -> bytes:
    """The raw little-endian bytes of `view`'s tensor for the initializer `init`, checked against it."""
    dtype = _ONNX_TO_TORCH.get(init.data_type)
    if dtype is None:
        raise ExportError(f"{template}: weight {init.name!r} has ONNX dtype {init.data_type}, not a float type")
    t = view.load(init.name, dtype).contiguous()
    if tuple(t.shape) != tuple(init.dims):
        raise ExportError(f"weight {init.name!r}: shape {list(t.shape)}, the template graph expects {list(init.dims)}")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()
