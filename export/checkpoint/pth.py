"""Safe `.pth` reading: names/shapes/dtypes without torch, tensors with `weights_only=True` + mmap.

`read_pth_header` walks the pickle of a zip-format `.pth` with an unpickler that knows only
the few globals a plain tensor state dict uses (storages, `_rebuild_tensor_v2`, `OrderedDict`),
so it runs no code and needs no torch: `inspect` types T5 / CLIP / VAE files in milliseconds.
Anything it does not know is handed to `torch.load(weights_only=True)`, whose verdict is final.
"""

from __future__ import annotations

import collections
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanrt.engines.errors import CheckpointError
from wanrt.engines.schema import short

from .safetensors_file import ITEMSIZE, MAX_DIM, MAX_RANK  # the same shape bounds as safetensors headers

if TYPE_CHECKING:
    import torch

# torch typed-storage class name (as pickled by torch.save) -> our dtype name
_STORAGE_DTYPES = {
    "FloatStorage": "fp32",
    "DoubleStorage": "fp64",
    "HalfStorage": "fp16",
    "BFloat16Storage": "bf16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "Float8_e4m3fnStorage": "fp8_e4m3",
    "Float8_e5m2Storage": "fp8_e5m2",
}
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class PthTensorInfo:
    """Name-independent facts about one tensor in a `.pth` file."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class _StorageRef:
    dtype: str


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _Unknown(Exception):
    """The pickle holds something the header reader does not model (torch decides)."""


class _Invalid(Exception):
    """The pickle is well formed but describes an impossible tensor (final: torch is not asked)."""


def _rebuild_tensor(storage, _offset, size, *_rest) -> PthTensorInfo:
    if not isinstance(storage, _StorageRef):
        raise _Unknown("tensor without a storage")
    if not isinstance(size, tuple) or len(size) > MAX_RANK:
        raise _Invalid(f"a tensor has an invalid shape {short(size)} (expected a tuple of at most {MAX_RANK} sizes)")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in size):
        raise _Invalid(f"a tensor has an invalid shape {short(size)} (sizes must be integers in [0, 2**63))")
    return PthTensorInfo(storage.dtype, size)


def _rebuild_parameter(data, *_rest):
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Builds `PthTensorInfo` placeholders instead of tensors; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _Unknown(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], _StorageType):
            return _StorageRef(pid[1].dtype)
        raise _Unknown(f"persistent id {pid!r:.80}")


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The state dict inside a `state_dict`/`model`/`module` wrapper, checked to be str -> tensor."""
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a dict of named tensors")
    return obj


def read_pth_header(path: str | Path) -> dict[str, PthTensorInfo]:
    """Key -> dtype/shape of a `.pth` state dict, without loading tensors (and without torch if possible)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise _Unknown("no data.pkl")
            with z.open(pkl) as f:
                obj = _HeaderUnpickler(f).load()
        state = unwrap_state_dict(obj, path)
        if not all(isinstance(v, PthTensorInfo) for v in state.values()):
            raise _Unknown("non-tensor values")
        return state
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except _Invalid as e:
        raise CheckpointError(f"{path}: not a valid tensor state dict: {e}") from None
    except CheckpointError:
        raise
    except (OSError, MemoryError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or content this reader does not model (a bad memo
        pass  # index is a KeyError, a bad opcode a ValueError...): torch's weights_only loader decides, and its verdict is final
    from .safetensors_file import dtype_name

    infos = {}
    for k, t in load_pth_state_dict(path).items():
        name = dtype_name(t.dtype)
        if name is None:
            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
        infos[k] = PthTensorInfo(name, tuple(t.shape))
    return infos


MAX_REASON_CHARS = 200


def first_sentence(line: str, limit: int = MAX_REASON_CHARS) -> str:
    """The first sentence of `line` without its full stop; past `limit` characters, cut at a word and marked "..."."""
    end = line.find(". ")
    sentence = (line if end < 0 else line[:end]).strip().rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def _blocked_reason(message: str) -> str:
    """The sentence of torch's weights_only error that names what was blocked."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "global" in ln.lower()]
    return first_sentence(named[0] if named else lines[-1]) if lines else "disallowed pickle content"


def _unreadable_reason(error: Exception) -> str:
    """Why torch could not read a `.pth` file, in our words where we know the case, else torch's first sentence."""
    message = str(error)
    if "_use_new_zipfile_serialization" in message:  # torch's mmap loader met something that is not a zip archive
        return "not a zip-format torch checkpoint (the torch.save format since PyTorch 1.6); legacy and non-torch files are not read"
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    if not line:
        return type(error).__name__
    if "zip archive" in line:
        return f"truncated or corrupt zip archive: {first_sentence(line)}"
    return first_sentence(line)


def load_pth_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Load a `.pth` state dict without executing code; unwrap a `state_dict`/`model` wrapper."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the pickle needs code to run ({_blocked_reason(str(e))});"
            " only plain tensor state dicts are accepted"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - RuntimeError, OSError, EOFError, KeyError...: a hostile file never escapes as a traceback
        raise CheckpointError(f"{path}: not a readable .pth file: {_unreadable_reason(e)}") from None
    state = unwrap_state_dict(obj, path)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of named tensors")
    return state
