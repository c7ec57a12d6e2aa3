"""ONNX export of the text encoder (umt5) and the image encoder (CLIP ViT-H/14).

Each writes `out_dir/model.onnx` + `out_dir/model.onnx.data` with the engine signatures of
`engines.signatures`.  The module is traced on the `meta` device and every weight is read (from
the checkpoint file, or from a module passed in), cast and written one at a time
(`export_onnx(weights=...)`), so exporting the 11 GB umt5-xxl never holds more than one tensor
besides the graph.

Precisions (graph I/O always int64 / float32):
- text encoder: fp32, bf16 (fp16 is refused: umt5-xxl overflows it).  The token table is stored
  in bf16 whenever the source holds it in bf16 (the official file does: nothing is lost) and
  gathered rows are cast to the compute dtype: umt5-xxl's 256384 x 4096 table is 3.9 GiB in
  fp32, over TensorRT's 2 GiB per weight (a wider table that size is rounded to bf16 for that
  reason); Gather is in TensorRT's bf16 list and ONNX Runtime's CPU Gather takes any type;
- image encoder: fp32, bf16, fp16 (the official pipeline runs the CLIP tower in fp16).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import image_encoder_signature, text_encoder_signature
from wanrt.export.checkpoint.view import TensorSource
from wanrt.export.models.clip import CLIPVisionConfig, CLIPVisionEncoder, open_clip_checkpoint
from wanrt.export.models.t5 import T5Config, T5Encoder, open_t5_checkpoint, relative_bucket_table

from .component import ExportedComponent
from .lint import MAX_INITIALIZER_BYTES
from .torch_to_onnx import GraphPass, export_onnx

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_PRECISIONS = ("fp32", "bf16")
IMAGE_PRECISIONS = ("fp32", "bf16", "fp16")
Loader = Callable[[], torch.Tensor]


def _dtype(precision: str, allowed: tuple[str, ...], component: str) -> torch.dtype:
    if precision not in allowed:
        raise WanrtError(f"{component} precision {precision!r}: expected one of {', '.join(allowed)}")
    return DTYPES[precision]


def export_text_encoder_onnx(
    source: str | os.PathLike | T5Encoder | None,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    task: str | None = None,
    passes: Sequence[GraphPass] = (),
    progress: bool = True,
) -> ExportedComponent:
    """Export the umt5 encoder (a checkpoint path or a module) to `out_dir/model.onnx` + `model.onnx.data`.

    A module is neither cast nor copied: the graph is traced on `meta` and its tensors are cast as written.
    """
    dtype = _dtype(precision, TEXT_PRECISIONS, "text encoder")
    if isinstance(source, T5Encoder):
        cfg, state = source.config, source.state_dict()
        table_dtype = token_table_dtype(cfg, dtype, holds_bf16_values(state[TOKEN_TABLE], cfg))
        others = {k: v for k, v in state.items() if k != TOKEN_TABLE}
        weights = _cast_loaders(others, dtype) | _cast_loaders({TOKEN_TABLE: state[TOKEN_TABLE]}, table_dtype)
    else:
        cfg, reader = open_t5_checkpoint(source, task)
        table_dtype = token_table_dtype(cfg, dtype, reader.header(TOKEN_TABLE).dtype == "bf16")
        weights = _read_loaders(reader, {k: k for k in reader.keys() if k != TOKEN_TABLE}, dtype)
        weights |= _read_loaders(reader, {TOKEN_TABLE: TOKEN_TABLE}, table_dtype)
    weights["bucket_table"] = lambda: relative_bucket_table(cfg, device="cpu")
    module = text_encoder_graph_module(cfg, dtype, table_dtype)
    with torch.device("meta"):
        example = {  # batch 2, 7 tokens: neither dim is 0/1, so torch.export keeps both dynamic
            "input_ids": torch.zeros(2, 7, dtype=torch.int64),
            "attention_mask": torch.ones(2, 7, dtype=torch.int64),
        }
    return export_onnx(module.eval(), example, out_dir, text_encoder_signature(cfg.dim), weights=weights, passes=passes,
                       progress=progress, cache_as={"text_encoder": repr(cfg), "dtype": str(dtype),
                                                    "token_table_dtype": str(table_dtype)})  # fmt: skip


def export_image_encoder_onnx(
    source: str | os.PathLike | CLIPVisionEncoder | None,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    task: str | None = None,
    passes: Sequence[GraphPass] = (),
    progress: bool = True,
) -> ExportedComponent:
    """Export the CLIP vision tower (a checkpoint path or a module) to `out_dir/model.onnx` + `model.onnx.data`.

    The graph holds what Wan runs (every block but the last); the unused last block, post-norm and
    head are not written.  A module is neither cast nor copied.
    """
    dtype = _dtype(precision, IMAGE_PRECISIONS, "image encoder")
    if isinstance(source, CLIPVisionEncoder):
        cfg, weights = source.config, _cast_loaders(source.state_dict(), dtype)
    else:
        cfg, reader, names = open_clip_checkpoint(source, task)
        weights = _read_loaders(reader, names, dtype)
    module = image_encoder_graph_module(cfg, dtype)
    with torch.device("meta"):
        example = {"pixel_values": torch.zeros(2, 3, cfg.image_size, cfg.image_size)}
    signature = image_encoder_signature(cfg.width, cfg.image_size, cfg.tokens)
    return export_onnx(module.eval(), example, out_dir, signature, weights=weights, passes=passes, progress=progress,
                       cache_as={"image_encoder": repr(cfg), "dtype": str(dtype)})


TOKEN_TABLE = "token_embedding.weight"


def token_table_dtype(cfg: T5Config, dtype: torch.dtype, source_is_bf16: bool) -> torch.dtype:
    """The dtype the text-encoder graph stores its token table in (see the module docstring)."""
    too_big = cfg.vocab_size * cfg.dim * dtype.itemsize > MAX_INITIALIZER_BYTES
    return torch.bfloat16 if source_is_bf16 or too_big else dtype


def holds_bf16_values(table: torch.Tensor, cfg: T5Config) -> bool:
    """True when a token table is bf16 or holds only bf16 values (e.g. loaded from the bf16 file)."""
    if table.dtype == torch.bfloat16:
        return True
    if cfg.vocab_size * cfg.dim * 4 > MAX_INITIALIZER_BYTES:
        return False  # not worth a pass over the table: token_table_dtype rounds it anyway
    return bool(torch.equal(table.detach().to(torch.bfloat16).to(table.dtype), table.detach()))


def text_encoder_graph_module(cfg: T5Config, dtype: torch.dtype, table_dtype: torch.dtype) -> T5Encoder:
    """The umt5 encoder as traced for export, on `meta`: weights in `dtype`, token table in `table_dtype`."""
    with torch.device("meta"):
        module = T5Encoder(cfg).to(dtype)
    module.token_embedding.to(table_dtype)
    return module


def image_encoder_graph_module(cfg: CLIPVisionConfig, dtype: torch.dtype) -> CLIPVisionEncoder:
    """The CLIP vision tower as traced for export, on `meta`, weights in `dtype`."""
    with torch.device("meta"):
        return CLIPVisionEncoder(cfg).to(dtype)


def _read_loaders(reader: TensorSource, names: dict[str, str], dtype: torch.dtype) -> dict[str, Loader]:
    """Module parameter name -> a loader reading the stored tensor `names[name]` and casting it to `dtype`."""
    return {name: (lambda key=key: reader.read(key).to(dtype)) for name, key in names.items()}


def _cast_loaders(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Loader]:
    """Module parameter name -> a loader casting the module's own tensor to `dtype` (a copy only if needed)."""
    return {name: (lambda t=t: t.detach().to(dtype)) for name, t in state.items()}
