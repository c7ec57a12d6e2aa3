"""Sharded safetensors: a `*.safetensors.index.json` and the shard files its `weight_map` names.

DiT folders (`resolve`) and diffusers companion folders (`companions`) are both read through
here: the index is read and checked once, by these functions, and `ShardedSource` reads the
tensors of an index and its shards on demand.  Headers only; no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wanrt.engines.errors import CheckpointError

from .lightx2v_config import read_json
from .safetensors_file import TensorHeader
from .view import TensorSource, open_source

INDEX_SUFFIX = ".safetensors.index.json"  # diffusion_pytorch_model.safetensors.index.json, model.safetensors.index.json


@dataclass(frozen=True)
class ShardIndex:
    """A read index: the shard files it names (each exists) and which shard holds each tensor."""

    path: Path
    shards: list[Path]
    weight_map: dict[str, Path]  # tensor name -> shard file


def is_index(path: Path) -> bool:
    """True for a `*.safetensors.index.json` file name."""
    return path.name.endswith(INDEX_SUFFIX)


def shard_path(index: Path, shard: str) -> Path | None:
    """Where a weight_map entry (`name`, `./name`, `sub/name`) points, relative to the index's folder; None if outside it."""
    rel = os.path.normpath(shard)
    if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep) or rel == ".":
        return None
    return index.parent / rel


def read_index(index: Path) -> ShardIndex:
    """Read an index: its weight_map, and the shard files it names (each checked to exist in the index's folder)."""
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: safetensors index without a weight_map")
    shards: dict[str, Path] = {}
    for name in dict.fromkeys(str(v) for v in weight_map.values()):
        path = shard_path(index, name)
        if path is None:
            raise CheckpointError(f"{index}: names shard {name}, which is missing from {index.parent} (shards must sit in the index's folder)")
        if not path.is_file():
            raise CheckpointError(f"{index}: names shard {name}, which is missing from {index.parent}")
        shards[name] = path
    return ShardIndex(index, list(dict.fromkeys(shards.values())), {key: shards[str(v)] for key, v in weight_map.items()})


def check_index(index: ShardIndex, sources: Mapping[Path, TensorSource]) -> None:
    """Every tensor the index lists is in the shard it names (`sources`: shard file -> its opened source)."""
    by_shard: dict[Path, list[str]] = {}
    for key, shard in index.weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in by_shard.items():
        source = sources[shard]
        missing = next((k for k in keys if k not in source), None)
        if missing is not None:
            rel = shard.relative_to(index.path.parent)
            raise CheckpointError(f"{index.path}: lists tensor {missing!r} in {rel}, but {rel} has no such tensor")


def index_listing(shard: Path) -> Path | None:
    """The index beside a file that names it as one of its shards, if any."""
    for index in shard.parent.glob("*" + INDEX_SUFFIX):
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if isinstance(weight_map, dict) and shard in {shard_path(index, str(v)) for v in weight_map.values()}:
            return index
    return None


class ShardedSource(TensorSource):
    """The tensors of a `*.safetensors.index.json` and its shards, read on demand."""

    def __init__(self, index: Path):
        self.index = read_index(index)
        self.path, self.metadata = index, {}
        sources = {p: open_source(p) for p in self.index.shards}
        check_index(self.index, sources)
        self.where = {key: sources[shard] for key, shard in self.index.weight_map.items()}

    @property
    def shards(self) -> list[Path]:
        return self.index.shards

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def header(self, key: str) -> TensorHeader:
        return self._source(key).header(key)

    def read(self, key: str):
        return self._source(key).read(key)

    def _source(self, key: str) -> TensorSource:
        try:
            return self.where[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None
