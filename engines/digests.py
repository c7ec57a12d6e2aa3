"""File sha256 digests, remembered per file state so large weights are hashed once.

A digest is stored under the file's stamp (device, inode, size, mtime in ns) in
`$WANRT_CACHE_DIR/digests.json` (default `~/.cache/wanrt`). A rename keeps the stamp, so
hashes taken while a bundle is staged still hold after it is renamed into place; a copy, an
edit or a truncation changes it, and the file is hashed again. `verify` never uses the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .files import DiskError, atomic_write_text

MAX_ENTRIES = 20_000  # oldest entries are dropped beyond this


def cache_file() -> Path:
    """Where digests are remembered: `$WANRT_CACHE_DIR/digests.json`, else the user's cache folder."""
    root = os.environ.get("WANRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wanrt"
    )
    return Path(root) / "digests.json"


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> str:
    """The state a remembered digest is valid for: device, inode, size and mtime (ns)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _load() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(entries: dict[str, str]) -> None:
    path = cache_file()
    if len(entries) > MAX_ENTRIES:
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    with contextlib.suppress(OSError, DiskError):  # the cache only saves time
        atomic_write_text(path, json.dumps(entries), fsync=False)


def hash_and_remember(paths: list[str | os.PathLike], use_remembered: bool = True) -> dict[str, str]:
    """`{str(path): sha256}`; with `use_remembered`, files whose state was hashed before are not read again.

    A file's state is taken before it is read, so one that changes while being hashed is hashed again next time.
    """
    if not paths:
        return {}
    entries = _load()
    out, changed = {}, False
    for path in paths:
        stamp = file_stamp(path)
        digest = entries.get(stamp) if use_remembered else None
        if digest is None:
            digest = sha256_file(path)
            entries.pop(stamp, None)
            entries[stamp] = digest
            changed = True
        out[str(path)] = digest
    if changed:
        _store(entries)
    return out


def cached_sha256(paths: list[str | os.PathLike]) -> dict[str, str]:
    """`{str(path): sha256}`, hashing only files whose state has no remembered digest."""
    return hash_and_remember(paths, use_remembered=True)
