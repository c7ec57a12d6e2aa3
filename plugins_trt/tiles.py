"""Per-architecture facts and tile candidates for our attention kernel (one table; lookups derive from it).

For each GPU architecture the table gives the most shared memory one block may opt into, the
oldest PTX ISA that architecture accepts (we emit that one, so every driver that supports the GPU
loads the PTX: ISA 8.4 is CUDA 12.4 / driver r550), and, per (precision, head_dim), the tilings
worth trying, best guess first, ending with one of at most 48 KB of shared memory (for 16-bit
inputs) for a launcher that does not opt into more.  plugin-build compiles each candidate, drops those that do not fit
the architecture's shared memory or that spill registers (ptxas's report, read from the cubin),
and offers the rest to TensorRT as tactics, which it times on the build GPU; `bench/attention.py`
times them all against torch SDPA.  The guesses: on sm_90 the 128-row query tiles of 8 warps
(two warpgroups issuing wgmma) with 64-128 key rows and 2-4 stages; sm_80 has mma.sync, 163 KB
and fewer registers per thread to spare, so 64-key tiles; sm_86/89/120 have 99 KB of shared
memory, so 32-64-key tiles with 2-3 stages.  Candidates were checked for registers and spills with
ptxas (Triton 3.9, see bench/RESULTS.md), not timed.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanrt.engines.errors import WanrtError

from .kernels import HEAD_DIMS, MIN_ARCH, PRECISIONS, TileConfig


def _t(block_m: int, block_n: int, num_warps: int, num_stages: int) -> TileConfig:
    return TileConfig(block_m, block_n, num_warps, num_stages)


@dataclass(frozen=True)
class ArchTiles:
    """What one architecture allows and which tilings to try there."""

    max_shared_bytes: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    ptx_isa: int  # oldest PTX ISA the architecture accepts (Triton's ptx_version: 84 = ISA 8.4)
    tiles: dict[tuple[str, int], tuple[TileConfig, ...]]  # (precision, head_dim) -> candidates


_HOPPER = {
    ("bf16", 128): (_t(128, 128, 8, 2), _t(128, 64, 8, 3), _t(128, 128, 8, 3), _t(128, 64, 8, 4), _t(64, 64, 4, 3), _t(64, 32, 4, 2)),
    ("fp8", 128): (_t(128, 128, 8, 2), _t(128, 64, 8, 3), _t(128, 128, 8, 3), _t(128, 64, 8, 4), _t(64, 64, 4, 3), _t(64, 32, 4, 2)),
    ("int8", 128): (_t(128, 64, 8, 3), _t(128, 64, 8, 4), _t(128, 128, 8, 2), _t(64, 64, 4, 3), _t(64, 32, 4, 2)),
    ("bf16", 64): (_t(128, 128, 8, 3), _t(128, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 2)),
    ("fp8", 64): (_t(128, 128, 8, 3), _t(128, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 2)),
    ("int8", 64): (_t(128, 128, 8, 3), _t(128, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 2)),
}
_AMPERE = {
    ("bf16", 128): (_t(128, 64, 8, 3), _t(128, 64, 8, 4), _t(128, 32, 8, 4), _t(64, 64, 4, 3), _t(64, 32, 4, 2)),
    ("int8", 128): (_t(128, 32, 8, 3), _t(64, 64, 4, 2), _t(128, 64, 8, 3), _t(64, 32, 4, 2)),
    ("bf16", 64): (_t(128, 128, 8, 3), _t(128, 64, 4, 3), _t(64, 64, 4, 2)),
    ("int8", 64): (_t(128, 128, 8, 3), _t(128, 64, 4, 3), _t(64, 64, 4, 2)),
}
_SMALL_SMEM = {  # 99 KB per block: sm_86, sm_89, sm_120
    ("bf16", 128): (_t(128, 32, 8, 3), _t(64, 64, 4, 2), _t(128, 64, 8, 2), _t(64, 32, 4, 2)),
    ("fp8", 128): (_t(128, 32, 8, 3), _t(64, 64, 4, 2), _t(64, 32, 4, 2)),
    ("int8", 128): (_t(128, 32, 8, 3), _t(64, 64, 4, 2), _t(64, 32, 4, 2)),
    ("bf16", 64): (_t(128, 64, 4, 3), _t(128, 128, 8, 2), _t(64, 64, 4, 2)),
    ("fp8", 64): (_t(128, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 2)),
    ("int8", 64): (_t(128, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 2)),
}

# compute capability x 10 -> what it allows.  sm_100 runs Triton's tcgen05 path (tensor memory is
# allocated inside the kernel, nothing at launch); sm_120 (consumer Blackwell) uses mma.sync.
ARCHS: dict[int, ArchTiles] = {
    80: ArchTiles(166912, 84, _AMPERE),
    86: ArchTiles(101376, 84, _SMALL_SMEM),
    87: ArchTiles(166912, 84, _AMPERE),
    89: ArchTiles(101376, 84, _SMALL_SMEM),
    90: ArchTiles(232448, 84, _HOPPER),
    100: ArchTiles(232448, 86, _HOPPER),
    120: ArchTiles(101376, 87, _SMALL_SMEM),
}
# What plugin-build compiles for when there is no GPU to ask (the list).
DEFAULT_ARCHS = (80, 86, 89, 90)


def arch_tiles(arch: int) -> ArchTiles:
    """The table row of `arch` (a WanrtError naming the supported ones otherwise)."""
    if arch not in ARCHS:
        raise WanrtError(f"GPU architecture sm_{arch}: the attention kernel is built for {', '.join(f'sm_{a}' for a in ARCHS)}")
    return ARCHS[arch]


def supports(arch: int, precision: str) -> bool:
    """Whether `precision` runs on `arch` (fp8 e4m3 tensor cores start at sm_89)."""
    return arch >= MIN_ARCH[precision]


def candidates(arch: int, precision: str, head_dim: int) -> tuple[TileConfig, ...]:
    """The tilings to try for (precision, head_dim) on `arch`, best guess first."""
    if precision not in PRECISIONS:
        raise WanrtError(f"attention precision {precision!r}: expected one of {PRECISIONS}")
    if head_dim not in HEAD_DIMS:
        raise WanrtError(f"attention head size {head_dim}: the kernel is built for {HEAD_DIMS}")
    row = arch_tiles(arch)
    if not supports(arch, precision):
        raise WanrtError(f"attention precision {precision!r} needs sm_{MIN_ARCH[precision]} or newer, not sm_{arch}")
    return row.tiles[(precision, head_dim)]
