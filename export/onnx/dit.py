"""ONNX export of one DiT expert (`dit`, `dit_high_noise`, `dit_low_noise`).

The module is traced on the `meta` device and each weight is read from the checkpoint view
(official key -> ref; `view.load(key, dtype)` dequantizes fp8/int8) only while the data file is
written, so the export never holds a copy of the model.  I/O is `dit_signature`, float32 in
every precision; dynamic batch, latent frames, height and width (height/width in multiples of
the patch size).  `precision="bf16"` stores and runs the big linears and attention in bf16 with
float32 islands (see `export.models.wan_dit`).  A VACE DiT (`export.models.wan_vace`) adds the
`vace_context` and `context_scale` inputs.

Wan2.2 A14B's two experts share one graph and differ only in their weights: the second is
written from the first one's graph (`template=`) without tracing again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from tqdm import tqdm

from wanrt.engines.model import DiTConfig
from wanrt.engines.signatures import EngineSignature
from wanrt.export.models.wan_animate import WanAnimateDiT, animate_param_dtype, animate_signature_for, expected_animate_parameters, motion_basis
from wanrt.export.models.wan_dit import check_view, dit_module, param_dtype, signature_for, view_config

from .component import GRAPH_FILE, ExportedComponent, ExportError, data_file, staged_graph
from .torch_to_onnx import MIN_OPSET, GraphPass, export_onnx

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the DiT's export precisions
EXAMPLE_SIZES = {"batch": 2, "frames": 3, "height": 6, "width": 10,  # a 3x3x5-patch grid; batch 2 (not 1)
                 "pose_frames": 2, "face_frames": 5}  # Animate: frames - 1 pose latents, 4 * (frames - 2) + 1 face crops


def export_dit_onnx(
    view: Mapping,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    cfg: DiTConfig | None = None,
    attention: str = "native",
    template: Path | None = None,
    per_frame_timestep: bool | None = None,
    opset: int = MIN_OPSET,
    passes: Sequence[GraphPass] = (),
    progress: bool = True,
) -> ExportedComponent:
    """Export one DiT expert to `out_dir/model.onnx` + `model.onnx.data`.

    `cfg` defaults to the one the view's shapes imply.  `template`: the `model.onnx` of an expert
    exported with the same config, precision, attention and passes; its graph is written with
    `view`'s weights instead of tracing again (the result equals a fresh export byte for byte).
    """
    if precision not in DTYPES:
        raise ExportError(f"unsupported DiT precision {precision!r}; expected one of {sorted(DTYPES)}")
    cfg = cfg or view_config(view)
    check_view(view, cfg, expected_animate_parameters(cfg) if cfg.animate is not None else None)
    if template is not None:
        files = _write_like(Path(template), view, out_dir, progress)
        signature = animate_signature_for(cfg) if cfg.animate is not None else signature_for(cfg, per_frame_timestep)
        return ExportedComponent(files, signature)
    dtype = DTYPES[precision]
    dtype_of = param_dtype
    with torch.device("meta"):
        module = dit_module(cfg, dtype, attention, per_frame_timestep)
        if cfg.animate is not None:
            dtype_of = animate_param_dtype
    signature = module.signature
    weights = {name: _view_loader(view, name, dtype_of(name, dtype)) for name, _ in module.named_parameters()}
    buffers = _animate_buffers(module, view)
    return export_onnx(module, dit_example_inputs(signature), out_dir, signature, opset,
                       dynamic_dims=dit_dynamic_dims(cfg, signature), weights={**weights, **buffers}, passes=passes,
                       progress=progress, cache_as={"dit": cfg.to_dict(), "dtype": str(dtype), "attention": attention,
                                                    "per_frame_timestep": per_frame_timestep})  # fmt: skip


def _animate_buffers(module: torch.nn.Module, view: Mapping) -> dict[str, Callable[[], torch.Tensor]]:
    """Loaders of the Animate DiT's derived buffers: the motion directions' QR basis, from the view's weight."""
    if not isinstance(module, WanAnimateDiT):
        return {}
    key = "motion_encoder.dec.direction.weight"
    return {"motion_encoder.dec.direction.basis": lambda: motion_basis(view.load(key, torch.float32))}


def _view_loader(view: Mapping, key: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: view.load(key, dtype)


def dit_dynamic_dims(cfg: DiTConfig, signature: EngineSignature) -> dict[str, Any]:
    """Latent frames/height/width traced as multiples of the patch size (`2 * Dim("height_patches")`)."""
    dims: dict[str, Any] = {}
    for name, patch in zip(("frames", "height", "width"), cfg.patch_size):
        if patch > 1:
            lo, hi = signature.dim_ranges[name]
            dims[name] = patch * torch.export.Dim(f"{name}_patches", min=max(1, -(-lo // patch)), max=hi // patch)
    if cfg.animate is not None:  # Animate: pose latents skip the reference frame; face frames are the segment's video frames
        lo, hi = signature.dim_ranges["pose_frames"]
        pose = torch.export.Dim("pose_frames", min=max(lo, 2), max=hi)
        dims.update(frames=pose + 1, pose_frames=pose, face_frames=4 * pose - 3)
    return dims


def dit_example_inputs(signature: EngineSignature, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """Zero example inputs of the DiT signature at `EXAMPLE_SIZES` (empty tensors on meta)."""
    return {
        spec.name: torch.zeros([EXAMPLE_SIZES[d] if isinstance(d, str) else d for d in spec.shape], device=device)
        for spec in signature.inputs
    }


_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
}  # fmt: skip


def _write_like(template: Path, view: Mapping, out_dir: str | os.PathLike, progress: bool) -> list[Path]:
    """Write `template`'s graph with `view`'s weights to `out_dir`; return the graph and data paths.

    Each external initializer named after an official key is read from `view` in the template's
    dtype and written at the template's offset; the others (constants folded from the config)
    are copied from the template's data file.
    """
    model = onnx.load(str(template), load_external_data=False)
    data_name = data_file(template).name
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
    graph = Path(out_dir) / GRAPH_FILE
    with staged_graph(out_dir, data_file(template).stat().st_size) as tmp:
        with open(data_file(template), "rb") as src, open(tmp / data_file(graph).name, "wb") as dst:
            for offset, length, init in tqdm(sorted(externals, key=lambda e: e[0]), desc=f"writing {GRAPH_FILE}",
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
            dst.truncate(data_file(template).stat().st_size)
        onnx.save(model, str(tmp / GRAPH_FILE))
    return [graph, data_file(graph)]


def _weight_bytes(view: Mapping, init: onnx.TensorProto, template: Path) -> bytes:
    """The raw little-endian bytes of `view`'s tensor for the initializer `init`, checked against it."""
    dtype = _ONNX_TO_TORCH.get(init.data_type)
    if dtype is None:
        raise ExportError(f"{template}: weight {init.name!r} has ONNX dtype {init.data_type}, not a float type")
    t = view.load(init.name, dtype).contiguous()
    if tuple(t.shape) != tuple(init.dims):
        raise ExportError(f"weight {init.name!r}: shape {list(t.shape)}, the template graph expects {list(init.dims)}")
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()
