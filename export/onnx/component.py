"""What an ONNX export writes for one bundle component, and where.

Every exporter writes into the component's own folder `out_dir`: the graph `model.onnx` and
ONE external data file `model.onnx.data` beside it (the bundle layout of `engines.manifest`).
Both are written into a temporary folder inside `out_dir` and renamed into place, so an error
or Ctrl-C never leaves a graph without its data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanrt.engines.errors import WanrtError
from wanrt.engines.files import as_disk_error, commit_temporary, discard_temporary, new_temporary
from wanrt.engines.manifest import Component
from wanrt.engines.signatures import EngineSignature

GRAPH_FILE = "model.onnx"


class ExportError(WanrtError):
    """A module could not be exported, or its inputs do not fit the signature."""


def data_file(graph: Path) -> Path:
    """The external data file of the graph `graph`: `model.onnx` -> `model.onnx.data` beside it."""
    return graph.with_name(graph.name + ".data")


@dataclass
class ExportedComponent:
    """What an exporter wrote for one component, and what its manifest entry needs."""

    files: list[Path]  # the graph first, then its external data file
    signature: EngineSignature  # the graph's inputs and outputs, exactly
    attributes: dict[str, Any] = field(default_factory=dict)  # component-specific contract (the VAE's caches)

    @property
    def graph(self) -> Path:
        return self.files[0]

    def manifest_entry(
        self, name: str, kind: str, precision: str, root: Path, *, expert: str | None = None, cache_key: str = ""
    ) -> Component:
        """The bundle component these files make, with paths relative to the bundle folder `root`."""

        def rel(path: Path) -> str:
            return Path(path).absolute().relative_to(Path(root).absolute()).as_posix()

        return Component(
            name=name, kind=kind, onnx=rel(self.graph), signature=self.signature, precision=precision,
            files=sorted(rel(f) for f in self.files), expert=expert, cache_key=cache_key, attributes=self.attributes,
        )  # fmt: skip


@contextmanager
def staged_graph(out_dir: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder to write `model.onnx` + `model.onnx.data` into; on success both move to `out_dir`.

    On any error the temporary folder is removed, and so is `out_dir` if this created it (and it is empty);
    a full disk is a DiskError naming the graph and `needed_bytes` (about the weights' size).
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = new_temporary(out_dir / GRAPH_FILE, directory=True)
    try:
        yield tmp
        graph = tmp / GRAPH_FILE
        data_file(graph).touch(exist_ok=True)  # a graph without weights still gets its (empty) data file
        commit_temporary(data_file(graph), data_file(out_dir / GRAPH_FILE))  # the data first: a graph never lacks its data
        commit_temporary(graph, out_dir / GRAPH_FILE)
    except BaseException as e:
        failure = as_disk_error(e, out_dir / GRAPH_FILE, tmp, needed_bytes)
        discard_temporary(tmp)
        if created:
            try:
                out_dir.rmdir()
            except OSError:
                pass  # something else was written there meanwhile: leave it
        if failure is not None:
            raise failure from None
        raise
    discard_temporary(tmp)
