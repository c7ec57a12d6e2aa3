"""Tensor-name tables: one table of (official, theirs) names per model, both lookups derived from it.

Modelled on gguf-py's `TensorNameMap`: each row names one module (or one parameter) in Wan's
official form and in another tool's form; `{n}` stands for a block or layer index.  A lookup
tries the whole key, then the key without one of the table's parameter suffixes (`.weight`,
`.bias`), which is carried over.  Neither direction is written by hand: both read the same rows.

A row may name several stored tensors that make one official tensor (CLIP's q/k/v projections
are one official `to_qkv`), with a transform that combines them and splits them back
(`Transform`).  A lookup answers with the row, its names filled in for the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tables are read without torch; only combining tensors needs it
    import torch

Shape = tuple[int, ...]

_INDEX = re.compile(r"\d+")


@dataclass(frozen=True)
class Transform:
    """How stored tensors make one official tensor, and how that tensor splits back into them."""

    shape: Callable[[list[Shape]], Shape]  # stored shapes -> official shape
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor, int], list[torch.Tensor]]  # (official tensor, number of stored tensors)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return torch.cat(tensors)


SAME = Transform(lambda shapes: shapes[0], lambda ts: ts[0], lambda t, n: [t])  # a row without a transform
TRANSPOSE = Transform(lambda shapes: tuple(reversed(shapes[0])), lambda ts: ts[0].t().contiguous(), lambda t, n: [t.t().contiguous()])
CONCAT = Transform(lambda shapes: (sum(s[0] for s in shapes), *shapes[0][1:]), _cat, lambda t, n: list(t.chunk(n)))


def unsqueezed(leading: int) -> Transform:
    """The official tensor is the stored one with `leading` 1-dims in front."""
    ones = (1,) * leading
    return Transform(lambda shapes: ones + tuple(shapes[0]), lambda ts: ts[0].reshape(ones + tuple(ts[0].shape)),
                     lambda t, n: [t.reshape(t.shape[leading:])])


@dataclass(frozen=True)
class Row:
    """One official module or parameter (`{n}`: an index) and the stored name(s) it is made of."""

    official: str
    theirs: tuple[str, ...]
    transform: Transform | None = None  # how the stored tensors make the official one; None: the one stored tensor as it is


class _Templates:
    """Name templates -> rows, and the heads after which an index may stand."""

    def __init__(self, names: Iterable[tuple[str, Row]], what: str):
        self.rows: dict[str, Row] = {}
        for name, row in names:
            if name in self.rows:
                raise ValueError(f"{what} name {name!r} appears twice in the table")
            self.rows[name] = row
        self.heads = tuple(sorted({n.split("{n}")[0] for n in self.rows if "{n}" in n}, key=len, reverse=True))

    def find(self, key: str, suffixes: tuple[str, ...]) -> tuple[Row, str | None, str] | None:
        """(row, index, suffix) of the row naming `key`, or None."""
        for template, index in self._templates(key):
            if template in self.rows:
                return self.rows[template], index, ""
            for s in suffixes:
                if template.endswith(s) and template[: -len(s)] in self.rows:
                    return self.rows[template[: -len(s)]], index, s
        return None

    def _templates(self, key: str) -> Iterator[tuple[str, str | None]]:
        """`key` itself, then `key` with its index replaced by `{n}` (for each head it starts with)."""
        yield key, None
        for head in self.heads:
            if key.startswith(head) and (m := _INDEX.match(key, len(head))):
                yield head + "{n}" + key[m.end():], m.group()


def _fill(template: str, index: str | None, suffix: str) -> str:
    return (template if index is None else template.replace("{n}", index)) + suffix


class NameTable:
    """Rows of (official, theirs) names; lookups either way (None: no row names the key)."""

    def __init__(self, rows: Iterable[Row | tuple[str, str]], suffixes: tuple[str, ...] = (".weight", ".bias")):
        self.rows = tuple(r if isinstance(r, Row) else Row(r[0], (r[1],)) for r in rows)
        self.suffixes = suffixes
        self._official = _Templates(((r.official, r) for r in self.rows), "official")
        self._theirs = _Templates(((t, r) for r in self.rows for t in r.theirs), "their")

    def match_official(self, key: str) -> Row | None:
        """The row naming an official key, filled in for it: the stored names the key is made of."""
        return self._filled(self._official.find(key, self.suffixes))

    def match_theirs(self, key: str) -> Row | None:
        """The row naming a stored key, filled in for it: its official key (and the other stored keys of the row)."""
        return self._filled(self._theirs.find(key, self.suffixes))

    def to_official(self, key: str) -> str | None:
        """The official name of another tool's key."""
        m = self.match_theirs(key)
        return None if m is None else m.official

    def to_theirs(self, key: str) -> str | None:
        """The other tool's name of an official key (a row of one stored tensor)."""
        m = self.match_official(key)
        if m is not None and len(m.theirs) != 1:
            raise ValueError(f"official {key!r} is made of {len(m.theirs)} tensors; use match_official")
        return None if m is None else m.theirs[0]

    @staticmethod
    def _filled(found: tuple[Row, str | None, str] | None) -> Row | None:
        if found is None:
            return None
        row, index, suffix = found
        return Row(_fill(row.official, index, suffix), tuple(_fill(t, index, suffix) for t in row.theirs), row.transform)
