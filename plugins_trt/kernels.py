"""Our attention kernel as a specialised, launchable thing: what one compiled variant is
(`KernelSpec`), its Triton signature and launch grid (the same for the JIT launch here and for
TensorRT's ahead-of-time launch), and `run_attention` on torch tensors.

`run_attention` runs on CUDA tensors on a GPU, and on CPU tensors in Triton's interpreter, which
must be switched on (`TRITON_INTERPRET=1`) before Triton is first imported: Triton decides at
import time whether `@triton.jit` builds GPU kernels or interpreted Python.  Torch and Triton are
imported only when a kernel is needed, so this module can be read (plugin-build's planning, the
TensorRT registration) without them.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import asdict, dataclass
from functools import lru_cache

from wanrt.engines.errors import WanrtError

# QK^T precision -> the kernel's QK_FORMAT (flash_kernel.py); P @ V always runs in the input dtype.
QK_FORMATS = {"bf16": 0, "fp8": 1, "int8": 2}
PRECISIONS = tuple(QK_FORMATS)
# Input/output dtypes each precision accepts (Triton's names).  "bf16" precision means "no
# quantization": fp16/bf16 inputs use their own tensor-core dtype, fp32 inputs tf32.
IO_DTYPES = {"bf16": ("bf16", "fp16", "fp32"), "fp8": ("bf16", "fp16"), "int8": ("bf16", "fp16")}
HEAD_DIMS = (64, 128)
# The oldest GPU architecture (compute capability x 10) each precision runs on.
MIN_ARCH = {"bf16": 80, "fp8": 89, "int8": 80}
# K is smoothed by its mean over at most this many tokens (flash_kernel.py explains the choice).
MEAN_ROWS = 512
# The kernel's runtime parameters in launch order (TensorRT AOT ABI: inputs, int32 scalars, outputs).
POINTER_ARGS = ("Q", "K", "V")
SCALAR_ARGS = ("qk_scale_bits", "seq_q", "seq_k")
OUTPUT_ARGS = ("Out",)
KERNEL_NAME = "wan_attention_fwd"


@dataclass(frozen=True)
class TileConfig:
    """One tiling of the kernel: query rows and key rows per program, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant: QK^T precision, I/O dtype, head size and tiling."""

    precision: str  # "bf16" | "fp8" | "int8"
    dtype: str  # "bf16" | "fp16" | "fp32"
    head_dim: int
    tile: TileConfig

    def __post_init__(self) -> None:
        if self.precision not in QK_FORMATS:
            raise WanrtError(f"attention precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.dtype not in IO_DTYPES[self.precision]:
            raise WanrtError(f"attention precision {self.precision!r} takes {IO_DTYPES[self.precision]} inputs, not {self.dtype!r}")
        if self.head_dim not in HEAD_DIMS:
            raise WanrtError(f"attention head size {self.head_dim}: the kernel is built for {HEAD_DIMS}")
        if MEAN_ROWS % self.tile.block_n:
            raise WanrtError(f"tile {self.tile.label}: block_n must divide {MEAN_ROWS}")

    @property
    def label(self) -> str:
        return f"{self.precision}_{self.dtype}_d{self.head_dim}_{self.tile.label}"

    def signature(self) -> dict[str, str]:
        """Triton's signature: every parameter's type, constexprs included (ASTSource wants all)."""
        sig = {name: f"*{self.dtype}" for name in POINTER_ARGS}
        sig.update({name: "i32" for name in SCALAR_ARGS})
        sig.update({name: f"*{self.dtype}" for name in OUTPUT_ARGS})
        sig.update({name: "constexpr" for name in self.constexprs(interpreted=False)})
        return sig

    def constexprs(self, interpreted: bool) -> dict[str, object]:
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_M": self.tile.block_m,
            "BLOCK_N": self.tile.block_n,
            "QK_FORMAT": QK_FORMATS[self.precision],
            "MEAN_ROWS": MEAN_ROWS,
            "INTERPRETED": interpreted,
        }

    def pointer_alignment(self) -> dict[tuple[int, ...], list[list[object]]]:
        """Triton attrs: the tensor pointers are 16-byte aligned (TensorRT and torch buffers are)."""
        args = list(self.signature())
        return {(args.index(name),): [["tt.divisibility", 16]] for name in POINTER_ARGS + OUTPUT_ARGS}

    def grid(self, seq_q: int, batch_heads: int) -> tuple[int, int, int]:
        """Programs per launch: (query blocks, batch * heads, 1)."""
        return (math.ceil(seq_q / self.tile.block_m), batch_heads, 1)


def qk_scale_bits(scale: float) -> int:
    """The int32 the kernel reads as float32 scale * log2(e) (QDP passes only integer scalars)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise WanrtError(f"attention scale {scale!r}: expected a positive finite number")
    return struct.unpack("<i", struct.pack("<f", scale * math.log2(math.e)))[0]


def triton_dtype_name(dtype) -> str:
    """torch dtype -> Triton's name ("bf16", "fp16", "fp32")."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise WanrtError(f"attention inputs of dtype {dtype}: expected bfloat16, float16 or float32")
    return names[dtype]


@lru_cache(maxsize=None)
def flash_kernel():
    """The `@triton.jit` kernel (interpreted if TRITON_INTERPRET was set when Triton was imported)."""
    from . import flash_kernel as source

    return source.wan_attention_fwd


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def run_attention(q, k, v, scale: float, precision: str = "bf16", tile: TileConfig | None = None):
    """softmax(scale * q @ k^T) @ v with our Triton kernel, on [B, heads, S, head_dim] torch tensors.

    CUDA tensors run on the GPU (tile default: the first of `tiles.candidates` for its
    architecture); CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before import).
    """
    import torch

    from .tiles import candidates

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise WanrtError(f"attention inputs must be [B, heads, S, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise WanrtError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise WanrtError(f"attention inputs differ in dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if seq_q == 0 or seq_k == 0:
        raise WanrtError(f"attention over an empty sequence: Sq={seq_q}, Sk={seq_k}")
    scale_bits = qk_scale_bits(scale)
    on_gpu = q.is_cuda
    arch = _cuda_arch(q.device) if on_gpu else 90  # the interpreter: any listed architecture's tiles
    if on_gpu and arch < MIN_ARCH.get(precision, 0):
        raise WanrtError(f"attention precision {precision!r} needs sm_{MIN_ARCH[precision]} or newer; this GPU is sm_{arch}")
    spec = KernelSpec(precision, triton_dtype_name(q.dtype), head_dim, tile or candidates(arch, precision, head_dim)[0])
    if not on_gpu and not interpreting():
        raise WanrtError("run_attention on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    with torch.cuda.device(q.device) if on_gpu else contextlib.nullcontext():
        flash_kernel()[spec.grid(seq_q, batch * heads)](
            q, k, v, scale_bits, seq_q, seq_k, out,
            **spec.constexprs(interpreted=not on_gpu),
            num_warps=spec.tile.num_warps, num_stages=spec.tile.num_stages,
        )  # fmt: skip
    return out


def _cuda_arch(device) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor
