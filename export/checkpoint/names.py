"""Tensor-name tables: one table of (official, theirs) names per model, both lookups derived from it.

Modelled on gguf-py's `TensorNameMap`: each row names one module (or one parameter) in Wan's
official form and in another tool's form; `{n}` stands for a block or layer index.  A lookup
tries the whole key, then the key without one of the table's parameter suffixes (`.weight`,
`.bias`), which is carried over.  Neither direction is written by hand: `to_official` and
`to_theirs` read the same rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_INDEX = re.compile(r"\d+")


class _Side:
    """One direction of a table: template -> template, and where an index may stand."""

    def __init__(self, pairs: Iterable[tuple[str, str]], what: str):
        self.names: dict[str, str] = {}
        for mine, other in pairs:
            if mine in self.names:
                raise ValueError(f"{what} name {mine!r} appears twice in the table")
            self.names[mine] = other
        self.heads = tuple(sorted({m.split("{n}")[0] for m in self.names if "{n}" in m}, key=len, reverse=True))

    def lookup(self, key: str, suffixes: tuple[str, ...]) -> str | None:
        for template, index in self._templates(key):
            other = self.names.get(template)
            if other is None:
                suffix = next((s for s in suffixes if template.endswith(s) and template[: -len(s)] in self.names), None)
                if suffix is None:
                    continue
                other = self.names[template[: -len(suffix)]] + suffix
            return other if index is None else other.replace("{n}", index)
        return None

    def _templates(self, key: str):
        """`key` itself, then `key` with its block index replaced by `{n}` (for each head it starts with)."""
        yield key, None
        for head in self.heads:
            if key.startswith(head) and (m := _INDEX.match(key, len(head))):
                yield head + "{n}" + key[m.end():], m.group()


class NameTable:
    """(official, theirs) name rows; `to_official` / `to_theirs` map a key either way (None: no row)."""

    def __init__(self, rows: Iterable[tuple[str, str]], suffixes: tuple[str, ...] = (".weight", ".bias")):
        self.rows = tuple(rows)
        self.suffixes = suffixes
        self._official = _Side(self.rows, "official")
        self._theirs = _Side(((b, a) for a, b in self.rows), "their")

    def to_official(self, key: str) -> str | None:
        """The official name of another tool's key."""
        return self._theirs.lookup(key, self.suffixes)

    def to_theirs(self, key: str) -> str | None:
        """The other tool's name of an official key."""
        return self._official.lookup(key, self.suffixes)
