"""A strict, lazy safetensors reader: validates the header, then reads one tensor at a time.

Reads go through `readinto` at the tensor's offset, so only the tensors the caller holds
count towards resident memory (a whole-file mmap would keep every touched page resident).
Parsing headers needs no torch (so `inspect` stays fast); torch is imported on the first read.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanrt.engines.errors import CheckpointError
from wanrt.engines.schema import JsonLimits, describe, load_json, short

if TYPE_CHECKING:
    import torch

MAX_HEADER_SIZE = 100_000_000

# safetensors dtype string -> (our dtype name, torch dtype attribute name, bytes per element)
ST_DTYPES: dict[str, tuple[str, str, int]] = {
    "BOOL": ("bool", "bool", 1),
    "U8": ("uint8", "uint8", 1),
    "I8": ("int8", "int8", 1),
    "I16": ("int16", "int16", 2),
    "U16": ("uint16", "uint16", 2),
    "F16": ("fp16", "float16", 2),
    "BF16": ("bf16", "bfloat16", 2),
    "I32": ("int32", "int32", 4),
    "U32": ("uint32", "uint32", 4),
    "F32": ("fp32", "float32", 4),
    "F64": ("fp64", "float64", 8),
    "I64": ("int64", "int64", 8),
    "U64": ("uint64", "uint64", 8),
    "F8_E4M3": ("fp8_e4m3", "float8_e4m3fn", 1),
    "F8_E5M2": ("fp8_e5m2", "float8_e5m2", 1),
}
NAME_TO_ST = {name: st for st, (name, _, _) in ST_DTYPES.items()}
ITEMSIZE = {name: size for name, _, size in ST_DTYPES.values()}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of one of our dtype names ("bf16", "fp8_e4m3", ...)."""
    import torch

    return getattr(torch, ST_DTYPES[NAME_TO_ST[name]][1])


def dtype_name(dtype: "torch.dtype") -> str | None:
    """Our name of a torch dtype, or None when safetensors cannot store it."""
    import torch

    for name, attr, _ in ST_DTYPES.values():
        if getattr(torch, attr) == dtype:
            return name
    return None


def __getattr__(name: str) -> Any:
    # DTYPES / NAME_TO_TORCH / TORCH_TO_ST hold torch dtypes: built on first use so that
    # importing this module (and parsing headers) never imports torch.
    if name in ("DTYPES", "NAME_TO_TORCH", "TORCH_TO_ST"):
        import torch

        dtypes = {st: (n, getattr(torch, attr), size) for st, (n, attr, size) in ST_DTYPES.items()}
        tables = {
            "DTYPES": dtypes,
            "NAME_TO_TORCH": {v[0]: v[1] for v in dtypes.values()},
            "TORCH_TO_ST": {v[1]: k for k, v in dtypes.items()},
        }
        globals().update(tables)
        return tables[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header."""

    key: str
    dtype: str  # our name, e.g. "bf16", "fp8_e4m3"
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header of one .safetensors file, validated; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = _parse_header(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def header(self, key: str) -> TensorHeader:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def read(self, key: str) -> "torch.Tensor":
        """Read one tensor into a new CPU tensor of its stored dtype."""
        h = self.header(key)
        buf = empty_bytes(h.nbytes)
        if h.nbytes:
            self._read_into(memoryview(buf.numpy()), h)
        return buf.view(torch_dtype(h.dtype)).reshape(h.shape)

    def read_bytes(self, key: str) -> bytes:
        """One tensor's stored bytes, without torch (for small tensors such as ComfyUI's `comfy_quant` JSON)."""
        h = self.header(key)
        buf = bytearray(h.nbytes)
        if h.nbytes:
            self._read_into(memoryview(buf), h)
        return bytes(buf)

    def _read_into(self, view: memoryview, h: TensorHeader) -> None:
        got = 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while got < h.nbytes:
                    n = os.preadv(fd, [view[got:]], h.begin + got)
                    if n == 0:
                        break
                    got += n
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {h.key!r} ({e.strerror})") from None
        if got != h.nbytes:
            raise CheckpointError(f"{self.path}: tensor {h.key!r} ends past the end of the file (truncated)")


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    import ctypes  # only for reads: headers-only paths (inspect) skip it

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def empty_bytes(nbytes: int) -> "torch.Tensor":
    """A new uint8 CPU buffer; big ones are marked for transparent huge pages.

    Faulting in fresh memory 4 KiB at a time costs more than reading the bytes from the page
    cache (2-3x on the benchmark machine); with 2 MiB pages a streamed load runs at copy speed.
    """
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8)
    madvise = _madvise() if sys.platform.startswith("linux") and nbytes >= 2 * HUGE_PAGE else None
    if madvise is not None:
        start = -(-buf.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (buf.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            madvise(start, end - start, MADV_HUGEPAGE)  # a hint: failure changes nothing
    return buf


# What a header may hold before any arithmetic is done on it: a header is untrusted input.
HEADER_LIMITS = JsonLimits(max_bytes=MAX_HEADER_SIZE, max_depth=3, max_number_chars=20)  # 20 digits: a uint64
MAX_RANK = 16  # no Wan tensor has more than 5 dims; torch itself allows at most 64
MAX_DIM = 2**63 - 1


def _header_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt safetensors header: {what}")


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """(the header's JSON bytes, its length n, the file size); the length checked against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE or 8 + n > size:
                raise _header_error(path, f"header length {n} runs past the end of the file ({size} bytes)"
                                    if 8 + n > size else f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit")  # fmt: skip
            return f.read(n), n, size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def _checked_shape(path: Path, key: str, shape: Any) -> tuple[int, ...]:
    """A shape: a list of at most MAX_RANK non-negative integers, each below 2**63."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CheckpointError(f"{path}: tensor {short(key)} has an invalid shape {short(shape)}"
                              f" (expected a list of at most {MAX_RANK} sizes)")  # fmt: skip
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_DIM:
            raise CheckpointError(f"{path}: tensor {short(key)} has an invalid shape {short(shape)}"
                                  f" (dimension {short(dim)} is not an integer in [0, 2**63))")  # fmt: skip
    return tuple(shape)


def _parse_entry(path: Path, key: str, entry: Any, data_start: int, data_size: int) -> TensorHeader:
    """One tensor entry, checked: dtype known, shape bounded, offsets inside the data section and matching the size."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _header_error(path, f"entry {short(key)} lacks dtype/shape/data_offsets")
    st_dtype, offsets = entry["dtype"], entry["data_offsets"]
    if not isinstance(st_dtype, str) or st_dtype not in ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {short(key)} has unknown dtype {short(st_dtype)}; supported: {', '.join(ST_DTYPES)}")
    shape = _checked_shape(path, key, entry["shape"])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):  # fmt: skip
        raise CheckpointError(f"{path}: tensor {short(key)} has invalid data_offsets {short(offsets)}")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {short(key)} data_offsets [{begin}, {end}] out of range: the data section holds {data_size} bytes"
            " (file truncated or corrupt)"
        )
    name, _, itemsize = ST_DTYPES[st_dtype]
    needed = itemsize
    for dim in shape:  # stops as soon as the product passes the span: no arithmetic on huge products
        needed *= dim
        if needed > end - begin:
            break
    if needed != end - begin:
        wants = f"needs {needed}" if needed <= data_size else f"needs more than the {data_size}-byte data section"
        raise CheckpointError(f"{path}: tensor {short(key)} spans {end - begin} bytes but {st_dtype} {short(list(shape))} {wants}")
    return TensorHeader(key, name, shape, data_start + begin, data_start + end)


def _parse_header(path: Path) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    """Every tensor entry and the metadata of a safetensors file, or one CheckpointError naming what is wrong.

    The header is bounded before it is parsed (size, nesting, number length) and each entry before
    any arithmetic (rank, dims), so a hostile header fails fast with a short message.
    """
    raw, n, size = _read_header_bytes(path)
    header = load_json(raw, f"{path}: corrupt safetensors header", CheckpointError, HEADER_LIMITS)
    if not isinstance(header, dict):
        raise _header_error(path, f"expected a JSON object, got {describe(header)}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _header_error(path, "__metadata__ must be an object of strings")
    data_start = 8 + n
    data_size = size - data_start
    tensors = {key: _parse_entry(path, key, entry, data_start, data_size) for key, entry in header.items()}
    spans = sorted((t.begin, t.end, t.key) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _header_error(path, f"tensors {short(k0)} and {short(k1)} overlap")
    return tensors, dict(metadata)
