"""Sharded safetensors (`export/checkpoint/shards.py`): one index reader for DiT folders and companions.

Facts: safetensors' `*.safetensors.index.json` holds a `weight_map` tensor name -> shard file
(diffusers / transformers `save_pretrained`); peer-formats.md §5 for the file layout.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.export.helpers import assert_one_line_error, run_cli
from wanrt.engines.errors import CheckpointError
from wanrt.export.checkpoint.companions import open_companion
from wanrt.export.checkpoint.resolve import resolve_model
from wanrt.export.checkpoint.shards import ShardedSource, read_index

PACKAGE = Path(__file__).resolve().parents[3] / "export" / "checkpoint"


def split_into_shards(file: Path, index_name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Replace one safetensors file by two shards and an index (alternating keys, as a writer might)."""
    state = load_file(file)
    file.unlink()
    names = {key: f"part-{1 + i % 2}.safetensors" for i, key in enumerate(sorted(state))}
    for shard in sorted(set(names.values())):
        save_file({k: v for k, v in state.items() if names[k] == shard}, file.parent / shard)
    index = file.parent / index_name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": names}))
    return index, state


def test_sharded_source_reads_every_tensor_from_its_shard(tiny_model, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny_model("wan2.1", "t2v", "diffusers"), root)
    index, state = split_into_shards(root / "vae" / "diffusion_pytorch_model.safetensors",
                                     "diffusion_pytorch_model.safetensors.index.json")
    src = open_companion(index)
    assert isinstance(src, ShardedSource)
    assert src.shards == [root / "vae" / "part-1.safetensors", root / "vae" / "part-2.safetensors"]
    assert sorted(src.keys()) == sorted(state)
    for key, tensor in state.items():
        assert src.header(key).shape == tuple(tensor.shape)
        assert torch.equal(src.read(key), tensor)
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        src.read("nope")


def _list_a_tensor_in_the_wrong_shard(index: Path) -> tuple[str, str]:
    data = json.loads(index.read_text())
    key, shard = next(iter(data["weight_map"].items()))
    other = next(s for s in data["weight_map"].values() if s != shard)
    data["weight_map"][key] = other
    index.write_text(json.dumps(data))
    return key, other


def test_an_index_naming_the_wrong_shard_is_one_error_for_dits_and_companions(tiny_model, tmp_path):
    """The same check, and the same message, whether the index is a DiT folder's or a companion's."""
    root = tmp_path / "m"
    shutil.copytree(tiny_model("wan2.1", "t2v", "diffusers"), root)
    dit_index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    if not dit_index.exists():
        dit_index, _ = split_into_shards(root / "transformer" / "diffusion_pytorch_model.safetensors", dit_index.name)
    key, shard = _list_a_tensor_in_the_wrong_shard(dit_index)
    with pytest.raises(CheckpointError) as dit_error:
        resolve_model(root)
    assert str(dit_error.value) == f"{dit_index}: lists tensor {key!r} in {shard}, but {shard} has no such tensor"

    vae_index, _ = split_into_shards(root / "vae" / "diffusion_pytorch_model.safetensors", dit_index.name)
    key, shard = _list_a_tensor_in_the_wrong_shard(vae_index)
    with pytest.raises(CheckpointError) as companion_error:
        open_companion(vae_index)
    assert str(companion_error.value) == f"{vae_index}: lists tensor {key!r} in {shard}, but {shard} has no such tensor"


def test_read_index_needs_a_weight_map(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="safetensors index without a weight_map"):
        read_index(index)


def _runtime_nodes(node: ast.AST):
    """Every node of a module except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield from _runtime_nodes(child)


def _imports(module: Path) -> set[str]:
    """The sibling modules a module of the package imports when run (anywhere in it, lazily or not)."""
    names = set()
    for node in _runtime_nodes(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(a.name for a in node.names)
            elif node.module and node.module.startswith("wanrt.export.checkpoint."):
                names.add(node.module.split(".")[3])
    return names


def test_the_checkpoint_package_has_no_import_circle():
    graph = {p.stem: _imports(p) & {q.stem for q in PACKAGE.glob("*.py")} for p in PACKAGE.glob("*.py")}

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        for dep in graph[name]:
            visit(dep, (*path, name))

    for name in graph:
        visit(name, ())
    assert "resolve" not in graph["companions"] and {"companions", "resolve"} & graph["shards"] == set()


def test_missing_shard(official_copy):
    shard = official_copy / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.unlink()
    assert_one_line_error(["inspect", official_copy], shard.name, "missing", "index.json")


def _rewrite_index(folder: Path, rename) -> Path:
    """Rewrite the folder's index, naming each shard `rename(name)` instead of its bare file name."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: rename(v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return index


def test_index_shard_paths_resolve_relative_to_the_index(official_copy, tiny_model):
    """`./name` and `sub/name` in a weight_map are paths relative to the index's folder."""
    want = run_cli("inspect", tiny_model("wan2.1", "t2v", "official"), "--json").json()
    (official_copy / "shards").mkdir()
    second = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (official_copy / second).rename(official_copy / "shards" / second)
    _rewrite_index(official_copy, lambda name: f"shards/{name}" if name == second else f"./{name}")
    r = run_cli("inspect", official_copy, "--json")
    assert r.exit_code == 0, r.stderr
    got = r.json()
    assert got["experts"][0]["files"] == [
        str(official_copy / "diffusion_pytorch_model-00001-of-00002.safetensors"), str(official_copy / "shards" / second)
    ]
    assert got["dit"] == want["dit"] and got["experts"][0]["num_params"] == want["experts"][0]["num_params"]


@pytest.mark.parametrize("shard", ["./gone.safetensors", "sub/gone.safetensors", "../diffusion_pytorch_model-00001-of-00002.safetensors"])
def test_index_naming_a_missing_or_outside_shard(official_copy, shard):
    """A shard path that is missing, or escapes the index's folder (even to a real file), is the missing-shard error."""
    outside = official_copy.parent / "diffusion_pytorch_model-00001-of-00002.safetensors"
    shutil.copy(official_copy / outside.name, outside)
    index = _rewrite_index(official_copy, lambda name: shard)
    assert_one_line_error(["inspect", official_copy], index, f"names shard {shard}", "missing from")
