"""A streaming safetensors writer: the header is laid out up front, then tensors are written one at a time.

The caller declares every tensor's (key, dtype, shape) first; the writer computes the header
(tensors ordered as the safetensors library orders them: by decreasing dtype size, then by name,
so every tensor is aligned) and lets tensors arrive in any order, each written at its offset.
Only the tensor being written is in memory.  Output goes to a temporary file beside the
target, which is renamed over it on `commit()`; on error the temporary file is removed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from wanrt.engines.errors import CheckpointError
from wanrt.engines.files import commit_temporary, discard_temporary, disk_error, is_write_failure, new_temporary

from .safetensors_file import NAME_TO_ST, dtype_name


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(key, tensor.dtype, tuple(tensor.shape))


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The padded header bytes and each key's [begin, end) offsets within the data section."""
    specs = list(specs)
    seen: set[str] = set()
    for s in specs:
        if s.key in seen:
            raise CheckpointError(f"tensor {s.key!r} declared twice")
        if s.key == "__metadata__":
            raise CheckpointError("'__metadata__' is reserved and cannot name a tensor")
        if dtype_name(s.dtype) is None:
            raise CheckpointError(f"tensor {s.key!r}: dtype {s.dtype} cannot be stored in safetensors")
        seen.add(s.key)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise CheckpointError(f"safetensors metadata must map strings to strings; bad entries: {bad[:3]}")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for s in sorted(specs, key=lambda s: (-s.itemsize, s.key)):
        offsets[s.key] = (pos, pos + s.nbytes)
        header[s.key] = {"dtype": NAME_TO_ST[dtype_name(s.dtype)], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offsets


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian, row-major (a view when already contiguous on CPU)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: `with SafetensorsWriter(path, specs) as w: w.write(key, t)`."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        fsync: bool = True,
    ):
        self.path = Path(path)
        specs = list(specs)
        head, self.offsets = build_header(specs, metadata)
        self.specs = {s.key: s for s in specs}
        self.fsync = fsync
        self.data_start = len(head)
        self.size = self.data_start + sum(s.nbytes for s in self.specs.values())
        self.written: set[str] = set()
        self._fd: int | None = None
        self.tmp_path = self._disk_errors(new_temporary, self.path)
        self._fd = os.open(self.tmp_path, os.O_RDWR)
        try:
            self._disk_errors(os.ftruncate, self._fd, self.size)
            self._pwrite(memoryview(head), 0)
        except BaseException:
            self.abort()
            raise

    def _disk_errors(self, fn, *args):
        """fn(*args), a full disk / quota / I/O error becoming one DiskError naming the file and its size."""
        try:
            return fn(*args)
        except OSError as e:
            if is_write_failure(e):
                raise disk_error(e, self.path, None, self.size) from None
            raise

    def _pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None
        while len(data):
            n = self._disk_errors(os.pwrite, self._fd, data, offset)
            data, offset = data[n:], offset + n

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor (dtype and shape must match its spec)."""
        if self._fd is None:
            raise CheckpointError(f"{self.path}: writer already closed")
        spec = self.specs.get(key)
        if spec is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} was not declared")
        if key in self.written:
            raise CheckpointError(f"{self.path}: tensor {key!r} written twice")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)}; declared {spec.dtype} {list(spec.shape)}"
            )
        if spec.nbytes:
            self._pwrite(_tensor_bytes(tensor), self.data_start + self.offsets[key][0])
        self.written.add(key)

    def commit(self) -> Path:
        """Check every tensor was written, flush, and rename the temporary file onto `path`."""
        missing = [k for k in self.specs if k not in self.written]
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: {len(missing)} declared tensors never written, e.g. {missing[:3]}")
        assert self._fd is not None
        try:
            os.close(self._fd)
            self._fd = None
            self._disk_errors(commit_temporary, self.tmp_path, self.path, self.fsync)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; `path` is left as it was."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "tmp_path", None) is not None:
            discard_temporary(self.tmp_path)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a dict of tensors in one call (small files; large ones should stream through SafetensorsWriter)."""
    with SafetensorsWriter(path, [TensorSpec.of(k, t) for k, t in tensors.items()], metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)
