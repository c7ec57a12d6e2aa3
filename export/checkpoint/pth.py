"""Safe `.pth` loading: `weights_only=True` (no code runs) and mmap (lazy)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .safetensors_file import CheckpointError


def load_pth_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a `.pth` state dict without executing code; unwrap a `state_dict`/`model` wrapper."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "disallowed pickle content"
        raise CheckpointError(
            f"{path}: refusing to load: the pickle needs code to run ({first[:200]}); only plain tensor state dicts are accepted"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .pth file ({str(e).splitlines()[0][:200]})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a dict of named tensors")
    return obj
