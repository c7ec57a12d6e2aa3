"""The CUDA runtime through cuda-python (`cuda.bindings.runtime`), in a few honest functions.

Modelled on TensorRT's `samples/python/common_runtime.py` (tensorrt.md §6): every call returns
`(err, *values)`; `call` turns a failure into a `CudaError` that names the call and CUDA's own
error, and an allocation failure into `CudaOutOfMemory` with the bytes asked for and the free
and total memory at that moment.  Everything the TensorRT backend does with the device goes
through this module (`bench/cuda_layer.py` exercises all of it on a GPU):

    device      `device_info` (count, set, compute capability, name), `memory_info` (cudaMemGetInfo)
    memory      `DeviceBuffer` (cudaMalloc / cudaFree), `PinnedBuffer` (cudaMallocHost / cudaFreeHost,
                a numpy view of it), `copy_to_device` / `copy_to_host` (cudaMemcpyAsync on a stream)
    ordering    `Stream` (one per backend), `Event` (record, elapsed time)
    graphs      `capture_graph` / `Graph` (stream capture, instantiate, launch)

Without an NVIDIA driver (this machine) the import works and every call returns an error
code, which `device_info` turns into one clear message.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from wanrt.engines.errors import WanrtError

GIB = 1 << 30


class CudaError(WanrtError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""


class CudaOutOfMemory(CudaError):
    """A device (or pinned host) allocation failed: not enough memory."""

    def __init__(self, message: str, requested_bytes: int, free_bytes: int | None, total_bytes: int | None) -> None:
        super().__init__(message)
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes


def cudart():
    """The `cuda.bindings.runtime` module; WanrtError naming the package when cuda-python is missing."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise WanrtError(f"cuda-python is not installed ({e}); `pip install \"wanrt[trt-runtime]\"` (or cuda-python)") from None
    return runtime


def error_text(err: Any) -> str:
    """"cudaErrorNoDevice (no CUDA-capable device is detected)" for a `cudaError_t`."""
    rt = cudart()
    name = rt.cudaGetErrorName(err)[1]
    text = rt.cudaGetErrorString(err)[1]
    decode = lambda b: b.decode() if isinstance(b, bytes) else str(b)  # noqa: E731
    return f"{decode(name)} ({decode(text)})"


def call(result: tuple, what: str) -> Any:
    """The value(s) of a cuda-python call result `(err, *values)`; CudaError naming `what` on failure."""
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise CudaError(f"{what} failed: {error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU a backend runs on."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    total_bytes: int


def no_device_reason() -> str | None:
    """Why there is no usable CUDA device here (driver, device count), or None when there is one."""
    rt = cudart()
    driver = call(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    if not driver:
        return "no NVIDIA driver is loaded (libcuda not found)"
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return f"no CUDA device: {error_text(err)}"
    if count == 0:
        return "no CUDA device"
    return None


def device_info(index: int = 0) -> DeviceInfo:
    """Make device `index` current and describe it; CudaError when there is no such device."""
    reason = no_device_reason()
    if reason is not None:
        raise CudaError(reason)
    rt = cudart()
    count = call(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not 0 <= index < count:
        raise CudaError(f"--device {index}: this machine has {count} CUDA device(s) (0..{count - 1})")
    call(rt.cudaSetDevice(index), f"cudaSetDevice({index})")
    props = call(rt.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name, f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = call(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def _allocation(result: tuple, nbytes: int, what: str) -> int:
    """The pointer of an allocation result; CudaOutOfMemory with the free/total numbers when it failed for memory."""
    rt = cudart()
    err = result[0]
    if int(err) == int(rt.cudaError_t.cudaErrorMemoryAllocation):
        try:
            free, total = memory_info()
        except CudaError:
            free = total = None
        have = f"; {free / GIB:.2f} GiB free of {total / GIB:.2f} GiB" if free is not None else ""
        raise CudaOutOfMemory(f"out of memory allocating {nbytes / GIB:.2f} GiB for {what}{have}", nbytes, free, total)
    return int(call(result, f"allocating {nbytes} bytes for {what}"))


@dataclass
class _Memory:
    """`nbytes` at `ptr`, allocated and freed by the CUDA calls the subclass names; `free()` is idempotent."""

    ptr: int
    nbytes: int
    ALLOCATE = ""  # cudart function: nbytes -> (err, ptr)
    FREE = ""  # cudart function: ptr -> (err,)

    @classmethod
    def allocate(cls, nbytes: int, what: str = "a buffer"):
        nbytes = max(int(nbytes), 1)
        return cls(_allocation(getattr(cudart(), cls.ALLOCATE)(nbytes), nbytes, what), nbytes)

    def free(self) -> None:
        if self.ptr:
            call(getattr(cudart(), self.FREE)(self.ptr), self.FREE)
            self.ptr, self.nbytes = 0, 0


class DeviceBuffer(_Memory):
    """Device memory (cudaMalloc / cudaFree)."""

    ALLOCATE, FREE = "cudaMalloc", "cudaFree"


class PinnedBuffer(_Memory):
    """Page-locked host memory (cudaMallocHost / cudaFreeHost), for asynchronous copies."""

    ALLOCATE, FREE = "cudaMallocHost", "cudaFreeHost"

    def array(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A numpy view of the first bytes of the buffer (valid until `free`)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"{count * dtype.itemsize} bytes do not fit a pinned buffer of {self.nbytes}")
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class Stream:
    """One CUDA stream; `handle` is the integer TensorRT's `execute_async_v3` takes."""

    def __init__(self) -> None:
        self._stream = call(cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream) if self._stream is not None else 0

    @property
    def raw(self):
        return self._stream

    def synchronize(self) -> None:
        call(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self._stream is not None:
            call(cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


class Event:
    """A CUDA event, recorded on a stream; pairs of them time device work."""

    def __init__(self) -> None:
        self._event = call(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        call(cudart().cudaEventRecord(self._event, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        call(cudart().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    def seconds_since(self, start: "Event") -> float:
        """Device time from `start` to this event (both recorded and complete)."""
        return float(call(cudart().cudaEventElapsedTime(start._event, self._event), "cudaEventElapsedTime")) / 1000.0

    def destroy(self) -> None:
        if self._event is not None:
            call(cudart().cudaEventDestroy(self._event), "cudaEventDestroy")
            self._event = None


def _host_pointer(host: np.ndarray | PinnedBuffer) -> int:
    if isinstance(host, PinnedBuffer):
        return host.ptr
    if not host.flags.c_contiguous:
        raise ValueError("host arrays for device copies must be C-contiguous")
    return int(host.ctypes.data)


def copy_to_device(dst: int, host: np.ndarray | PinnedBuffer, nbytes: int, stream: Stream) -> None:
    """Host -> device on `stream` (asynchronous when `host` is pinned memory)."""
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    call(rt.cudaMemcpyAsync(dst, _host_pointer(host), nbytes, kind, stream.raw), "cudaMemcpyAsync host->device")


def copy_to_host(host: np.ndarray | PinnedBuffer, src: int, nbytes: int, stream: Stream) -> None:
    """Device -> host on `stream` (asynchronous when `host` is pinned memory)."""
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    call(rt.cudaMemcpyAsync(_host_pointer(host), src, nbytes, kind, stream.raw), "cudaMemcpyAsync device->host")


class Graph:
    """An instantiated CUDA graph, replayed with `launch`."""

    def __init__(self, graph, executable) -> None:
        self._graph, self._exec = graph, executable

    def launch(self, stream: Stream) -> None:
        call(cudart().cudaGraphLaunch(self._exec, stream.raw), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self._exec is not None:
            call(rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            call(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None


def capture_graph(stream: Stream, work: Callable[[], object]) -> Graph:
    """Capture the device work `work()` enqueues on `stream` into a graph (demoDiffusion's pattern).

    `work` returning False (TensorRT's enqueue failing inside the capture) ends the capture and
    raises CudaError; so does an operation that cannot be captured.
    """
    rt = cudart()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
    call(rt.cudaStreamBeginCapture(stream.raw, mode), "cudaStreamBeginCapture")
    try:
        ok = work()
    finally:
        err, graph = rt.cudaStreamEndCapture(stream.raw)
    if ok is False:
        if int(err) == 0 and graph is not None:
            rt.cudaGraphDestroy(graph)
        raise CudaError("the work enqueued during CUDA graph capture failed")
    if int(err) != 0:
        raise CudaError(f"cudaStreamEndCapture failed: {error_text(err)}")
    executable = call(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
    return Graph(graph, executable)
