"""ONNX export of the Wan VAE chunk engines `vae_encoder` and `vae_decoder`.

Each engine runs one temporal chunk with its causal caches as explicit inputs and outputs
(the contract is documented in `engines.vae_contract`).  The cache list (channels, frames,
spatial scale) is read off the module itself by running one chunk on a tiny input, so the
contract always describes the graph that was exported.

Given a checkpoint path, the module is traced on the `meta` device and every weight is read,
converted to fp32 and written one at a time (`export_onnx(weights=...)`).

Precision: fp32 only, as the official code runs the VAE.  A bf16 graph is not offered: ONNX
`Conv` has no bfloat16 before opset 22, which TensorRT 10.1's parser (opsets 9-20) does not
read and ONNX Runtime's CPU kernels cannot run, so it could be neither linted nor tested.  A
TensorRT build may still pick reduced-precision kernels for the fp32 graph.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from wanrt.engines.errors import WanrtError
from wanrt.engines.signatures import EngineSignature
from wanrt.engines.vae_contract import PARTS, CacheSpec, VAEChunkContract
from wanrt.export.models.vae import WanVAE, read_vae_checkpoint

from .component import ExportedComponent
from .torch_to_onnx import GraphPass, export_onnx

PRECISIONS = ("fp32",)
PROBE_SIZE = 2  # latent rows/columns of the shape probe (any size works; caches scale with it)
EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 3, 4  # distinct, > 1: torch.export keeps them dynamic


class VAEChunkModule(nn.Module):
    """One encoder or decoder chunk call: (main input, first, *caches) -> (main output, *caches).

    `forward` lists every engine input as its own positional parameter (named as in the
    signature), because `torch.export` binds inputs by the forward signature.
    """

    def __init__(self, vae: WanVAE, part: str, input_names: Sequence[str]):
        super().__init__()
        self.vae, self.part = vae, part
        forward = lambda *inputs: self.run_chunk(*inputs)  # noqa: E731
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in input_names]
        )
        self.forward = forward

    def run_chunk(self, x: torch.Tensor, first: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = self.vae.encode_chunk if self.part == "encoder" else self.vae.decode_chunk
        out, new_caches = step(x, first, list(caches))
        return (out, *new_caches)


def chunk_contract(vae: WanVAE, part: str) -> VAEChunkContract:
    """The chunk contract of `vae`'s encoder or decoder, its caches probed on the module's own device."""
    if part not in PARTS:
        raise WanrtError(f"unknown VAE part {part!r}; expected one of {PARTS}")
    cfg, n = vae.cfg, PROBE_SIZE
    param = next(vae.parameters())
    first = torch.ones(1, dtype=torch.bool, device=param.device)
    with torch.no_grad():
        if part == "decoder":
            x = torch.zeros(1, cfg.z_dim, 1, n, n, dtype=param.dtype, device=param.device)
            _, caches = vae.decode_chunk(x, first)
        else:
            s = cfg.spatial_stride
            x = torch.zeros(1, 3, vae.chunk_frames, n * s, n * s, dtype=param.dtype, device=param.device)
            _, caches = vae.encode_chunk(x, first)
    specs = []
    for c in caches:
        scale = c.shape[3] // n
        if c.shape[3] != scale * n or c.shape[4] != scale * n:
            raise WanrtError(f"VAE {part} cache of shape {list(c.shape)} is not a whole multiple of the latent grid")
        specs.append(CacheSpec(int(c.shape[1]), int(c.shape[2]), int(scale)))
    return VAEChunkContract(
        part, cfg.version, cfg.z_dim, cfg.spatial_stride, vae.chunk_frames, tuple(specs), cfg.patch_size
    )


def example_inputs(contract: VAEChunkContract, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zero example inputs for tracing (height and width distinct and > 1)."""
    h, w, s = EXAMPLE_HEIGHT, EXAMPLE_WIDTH, contract.spatial_stride
    if contract.part == "encoder":
        main = {"video": torch.zeros(1, 3, contract.chunk_frames, h * s, w * s, device=device)}
    else:
        main = {"latent": torch.zeros(1, contract.z_dim, 1, h, w, device=device)}
    inputs = {**main, "first": torch.ones(1, dtype=torch.bool, device=device)}
    for i in range(len(contract.caches)):
        inputs[contract.cache_names(i)[0]] = torch.zeros(contract.cache_shape(i, h, w), device=device)
    return inputs


def derived_dims(signature: EngineSignature) -> dict[str, Any]:
    """`torch.export` dims for the signature's input dims: `height_xS` is S·height (likewise width)."""
    dims: dict[str, Any] = {}
    wanted = {d for spec in signature.inputs for d in spec.shape if isinstance(d, str)}
    for axis in ("height", "width"):
        lo, hi = signature.dim_ranges[axis]
        root = torch.export.Dim(axis, min=lo, max=hi)
        for name in wanted:
            if name == axis:
                dims[name] = root
            elif name.startswith(axis + "_x"):
                dims[name] = int(name[len(axis) + 2 :]) * root
    return dims


def export_vae_onnx(
    source: str | os.PathLike | WanVAE,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    part: str,
    passes: Sequence[GraphPass] = (),
    progress: bool = True,
) -> ExportedComponent:
    """Export the VAE's `part` chunk engine (`vae_encoder` / `vae_decoder`) to `out_dir/model.onnx` + `model.onnx.data`.

    `source` is a VAE checkpoint (official keys or diffusers names) or a `WanVAE`; the chunk
    contract (`engines.vae_contract`) is the component's attributes.
    """
    if precision not in PRECISIONS:
        raise WanrtError(
            f"VAE precision {precision!r}: the VAE engines are exported in fp32 only (as the official code runs "
            "the VAE; ONNX Conv has no bfloat16 before opset 22, beyond TensorRT 10.1's parser)"
        )
    weights: dict[str, Callable[[], torch.Tensor]] | None = None
    if isinstance(source, WanVAE):
        vae = source.float().eval()  # in place, like nn.Module.float()
    else:
        cfg, stored_names, reader = read_vae_checkpoint(source)
        with torch.device("meta"):
            vae = WanVAE(cfg).eval()
        weights = {f"vae.{name}": (lambda key=key: reader.read(key).float()) for name, key in stored_names.items()}
    contract = chunk_contract(vae, part)
    signature = contract.signature()
    module = VAEChunkModule(vae, part, signature.input_names).eval()
    example = example_inputs(contract, "meta" if weights is not None else "cpu")
    exported = export_onnx(module, example, out_dir, signature, dynamic_dims=derived_dims(signature), weights=weights,
                           passes=passes, progress=progress,
                           cache_as={"vae": repr(vae.cfg), "part": part, "contract": contract.attributes()})  # fmt: skip
    return replace(exported, attributes=contract.attributes())
