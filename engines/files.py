"""Permissions for outputs built under temporary names (`mkstemp`/`mkdtemp` make them private)."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """chmod `path` to what a plain `open`/`mkdir` would have made: 0o666 (0o777 for a folder) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
