"""Traced graphs remembered across builds: a module whose architecture was exported before is not traced again.

Tracing (torch.export, its decompositions, the ONNX translation, our optimizer) is most of an
export's time, and its result depends on the module's architecture, never on its weight values.
`export_onnx(..., cache_as=...)` stores the optimized graph, before the component's passes, under
`<wanrt cache>/graphs/<key>/`: `model.onnx`, and a data file that holds the constants folded from
the config while each weight's byte range is a hole (a sparse file: no disk space), plus
`weights.json` naming the weights.  The next export with the same key loads it, attaches its own
module's weights (every named weight must have one, else the entry is not used) and runs its
passes, as after a fresh trace.  A Wan2.2 expert, a quantized build over an fp32 one, a LoRA
variant or another bundle of the same model size are written without a trace.

The key (`graph_key`) covers the exporter's description of the architecture (its config, dtype and
options), the module's class and every parameter's and buffer's name, shape and dtype, the
signature with its dim ranges, the traced dims, the opset, and `export_versions()` (wanrt's code
digest and the export libraries' versions).  Entries are written atomically; one that cannot be
read is removed and written again; a published one is never replaced, so a build reading it is
never cut off by another storing the same key.  `WANRT_GRAPH_CACHE=0` turns the cache off;
`WANRT_GRAPH_CACHE=FOLDER` puts it elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import suppress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from wanrt.engines.digests import cache_file
from wanrt.engines.errors import WanrtError
from wanrt.engines.files import discard_temporary, new_temporary, remove_path
from wanrt.engines.signatures import EngineSignature
from wanrt.export.versions import export_versions

from .component import GRAPH_FILE, data_file
from .ir_tensors import attach_lazy_weights

WEIGHTS_FILE = "weights.json"
DATA_FILE = data_file(Path(GRAPH_FILE)).name


def cache_enabled() -> bool:
    """Whether exports use the traced-graph cache (`WANRT_GRAPH_CACHE=0` turns it off)."""
    return os.environ.get("WANRT_GRAPH_CACHE", "") != "0"


def cache_root() -> Path:
    """`$WANRT_GRAPH_CACHE` when it names a folder, else `<wanrt cache>/graphs` (`$WANRT_CACHE_DIR`, else the
    user's cache folder)."""
    folder = os.environ.get("WANRT_GRAPH_CACHE", "")
    return Path(folder) if folder not in ("", "0", "1") else cache_file().parent / "graphs"


def graph_key(
    architecture: Mapping[str, Any],
    module: torch.nn.Module,
    signature: EngineSignature,
    opset: int,
    dynamic_dims: Mapping[str, Any] | None,
) -> str:
    """sha256 of everything the traced, optimized graph depends on (see the module docstring)."""
    tensors = [[name, list(t.shape), str(t.dtype)] for name, t in module.state_dict(keep_vars=True).items()]
    payload = {
        "architecture": architecture,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "tensors": tensors,
        "signature": signature.to_dict(),
        "dynamic_dims": {name: repr(dim) for name, dim in sorted((dynamic_dims or {}).items())},
        "opset": opset,
        "versions": export_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _nbytes(value: ir.Value) -> int:
    return int(math.prod(value.shape.numpy()) * value.dtype.itemsize)


def store_graph(key: str, model: ir.Model, weights: set[str], root: Path | None = None) -> Path | None:
    """Write `model` into the cache under `key`, the initializers named in `weights` as holes; return the entry
    (None when the cache cannot be written: a full disk or a read-only cache costs only the next trace)."""
    entry = (root or cache_root()) / key
    try:
        return _store(entry, model, weights)
    except (OSError, WanrtError):
        return None


def _store(entry: Path, model: ir.Model, weights: set[str]) -> Path:
    if entry.exists():
        return entry  # another build stored it meanwhile: a published entry is never replaced
    inits = list(model.graph.initializers.values())
    originals = [v.const_value for v in inits]
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary(entry, directory=True)
    try:
        offset, layout = 0, []
        with open(tmp / DATA_FILE, "wb") as data:
            for value in inits:
                length = _nbytes(value)
                if value.name not in weights:
                    data.seek(offset)
                    data.write(value.const_value.tobytes())
                layout.append((value, offset, length))
                offset += length
            data.truncate(offset)  # the weights' ranges stay holes
        try:
            for value, start, length in layout:
                value.const_value = ir.ExternalTensor(DATA_FILE, start, length, value.dtype, shape=value.shape,
                                                      name=value.name, base_dir=tmp)  # fmt: skip
            ir.save(model, tmp / GRAPH_FILE)  # the external references as they are: no weight is read
        finally:
            for value, original in zip(inits, originals):
                value.const_value = original
        (tmp / WEIGHTS_FILE).write_text(json.dumps(sorted(weights & {v.name for v in inits})), encoding="utf-8")
        os.rename(tmp, entry)  # fails when another build published the entry first: then that one stays
    finally:
        discard_temporary(tmp)
    return entry


def load_graph(key: str, loaders: Mapping[str, Callable[[], torch.Tensor]], root: Path | None = None) -> ir.Model | None:
    """The cached graph of `key` with `loaders` as its weights' data, or None (absent, unreadable, or a weight
    without a loader)."""
    entry = (root or cache_root()) / key
    try:
        weights = json.loads((entry / WEIGHTS_FILE).read_text(encoding="utf-8"))
        if not set(weights) <= set(loaders):
            return None
        model = ir.load(entry / GRAPH_FILE)
    except Exception:  # noqa: BLE001 - a damaged entry is a miss: removed, traced and stored again
        with suppress(OSError):
            remove_path(entry)
        return None
    attach_lazy_weights(model, {name: loaders[name] for name in weights})
    return model
