"""File sha256 digests, remembered per file state so large weights are hashed once.

A digest is stored under the file's stamp (device, inode, size, mtime in ns) in
`$WANRT_CACHE_DIR/digests.json` (default `~/.cache/wanrt`). A rename keeps the stamp, so
hashes taken while a bundle is staged still hold after it is renamed into place; a copy, an
edit or a truncation changes it, and the file is hashed again. `verify` never uses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache only saves time


def remember_sha256(paths_and_digests: dict[str | os.PathLike, str]) -> None:
    """Record digests just computed for files in their current state."""
    entries = _load()
    for path, digest in paths_and_digests.items():
        stamp = file_stamp(path)
        entries.pop(stamp, None)
        entries[stamp] = digest
    _store(entries)


def cached_sha256(paths: list[str | os.PathLike]) -> dict[str, str]:
    """`{str(path): sha256}`, hashing only files whose state has no remembered digest."""
    entries = _load()
    out, fresh = {}, {}
    for path in paths:
        digest = entries.get(file_stamp(path))
        if digest is None:
            digest = fresh[path] = sha256_file(path)
        out[str(path)] = digest
    if fresh:
        remember_sha256(fresh)
    return out
