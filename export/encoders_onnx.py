"""ONNX export of the text encoder (umt5) and the image encoder (CLIP ViT-H/14).

Each writes `out_dir/model.onnx` + `out_dir/model.onnx.data` with the engine signatures of
`engines.signatures`.  The module is traced on the `meta` device and every weight is read (from
the checkpoint file, or from a module passed in), cast and written one at a time
(`export_onnx(weights=...)`), so exporting the 11 GB umt5-xxl never holds more than one tensor
besides the graph.

Precisions (graph I/O always int64 / float32):
- text encoder: fp32, bf16 (fp16 is refused: umt5-xxl overflows it);
- image encoder: fp32, bf16, fp16 (the official pipeline runs the CLIP tower in fp16).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from engines.errors import WanrtError
from engines.signatures import image_encoder_signature, text_encoder_signature
from export.checkpoint.view import TensorSource
from export.models.clip import CLIPVisionEncoder, open_clip_checkpoint
from export.models.t5 import T5Encoder, open_t5_checkpoint, relative_bucket_table
from export.onnx_export import export_onnx

ONNX_NAME = "model.onnx"
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
    progress: bool = True,
) -> list[Path]:
    """Export the umt5 encoder (a checkpoint path or a module) to `out_dir/model.onnx`; return the files.

    A module is neither cast nor copied: the graph is traced on `meta` and its tensors are cast as written.
    """
    dtype = _dtype(precision, TEXT_PRECISIONS, "text encoder")
    if isinstance(source, T5Encoder):
        cfg, weights = source.config, _cast_loaders(source.state_dict(), dtype)
    else:
        cfg, reader = open_t5_checkpoint(source, task)
        weights = _read_loaders(reader, {k: k for k in reader.keys()}, dtype)
    weights["bucket_table"] = lambda: relative_bucket_table(cfg, device="cpu")
    with torch.device("meta"):
        module = T5Encoder(cfg).to(dtype)
        example = {  # batch 2, 7 tokens: neither dim is 0/1, so torch.export keeps both dynamic
            "input_ids": torch.zeros(2, 7, dtype=torch.int64),
            "attention_mask": torch.ones(2, 7, dtype=torch.int64),
        }
    return export_onnx(module.eval(), example, Path(out_dir) / ONNX_NAME, text_encoder_signature(cfg.dim),
                       weights=weights, progress=progress)  # fmt: skip


def export_image_encoder_onnx(
    source: str | os.PathLike | CLIPVisionEncoder | None,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    task: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Export the CLIP vision tower (a checkpoint path or a module) to `out_dir/model.onnx`; return the files.

    The graph holds what Wan runs (every block but the last); the unused last block, post-norm and
    head are not written.  A module is neither cast nor copied.
    """
    dtype = _dtype(precision, IMAGE_PRECISIONS, "image encoder")
    if isinstance(source, CLIPVisionEncoder):
        cfg, weights = source.config, _cast_loaders(source.state_dict(), dtype)
    else:
        cfg, reader, names = open_clip_checkpoint(source, task)
        weights = _read_loaders(reader, names, dtype)
    with torch.device("meta"):
        module = CLIPVisionEncoder(cfg).to(dtype)
        example = {"pixel_values": torch.zeros(2, 3, cfg.image_size, cfg.image_size)}
    signature = image_encoder_signature(cfg.width, cfg.image_size, cfg.tokens)
    return export_onnx(module.eval(), example, Path(out_dir) / ONNX_NAME, signature, weights=weights, progress=progress)


def _read_loaders(reader: TensorSource, names: dict[str, str], dtype: torch.dtype) -> dict[str, Loader]:
    """Module parameter name -> a loader reading the stored tensor `names[name]` and casting it to `dtype`."""
    return {name: (lambda key=key: reader.read(key).to(dtype)) for name, key in names.items()}


def _cast_loaders(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Loader]:
    """Module parameter name -> a loader casting the module's own tensor to `dtype` (a copy only if needed)."""
    return {name: (lambda t=t: t.detach().to(dtype)) for name, t in state.items()}
