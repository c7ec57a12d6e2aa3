"""A strict, lazy safetensors reader: validates the header, then reads one tensor at a time.

Reads go through `readinto` at the tensor's offset, so only the tensors the caller holds
count towards resident memory (a whole-file mmap would keep every touched page resident).
Parsing headers needs no torch (so `inspect` stays fast); torch is imported on the first read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanrt.engines.errors import CheckpointError

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


def _parse_header(path: Path) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: header length {n} runs past the end of the file ({size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must be an object of strings")
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorHeader] = {}
    for key, entry in header.items():
        try:
            st_dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: entry {key!r} lacks dtype/shape/data_offsets") from None
        if st_dtype not in ST_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} has unknown dtype {st_dtype!r}; supported: {', '.join(ST_DTYPES)}"
            )
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
        name, _, itemsize = ST_DTYPES[st_dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets [{begin}, {end}]")
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {key!r} data_offsets [{begin}, {end}] out of range: the data section holds {data_size} bytes"
                " (file truncated or corrupt)"
            )
        if end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r} spans {end - begin} bytes but {st_dtype} {shape} needs {math.prod(shape) * itemsize}"
            )
        tensors[key] = TensorHeader(key, name, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((t.begin, t.end, t.key) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {k0!r} and {k1!r} overlap")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
