"""Atomic outputs: every file or folder wanrt writes appears whole under its name, or not at all.

One mechanism for bundles, the digest cache, ONNX graphs and their external data, safetensors
files, tiny models, mp4s and PNG frames:

1. `new_temporary(target)` creates `.NAME.tmp-PID-XXXXXXXX` beside `target` (same folder, so the
   final rename never crosses a file system; the name says which process owns it);
2. the caller writes into it;
3. `commit_temporary(tmp, target)` fsyncs what was written, gives it the permissions a plain
   `open`/`mkdir` would have (umask), and renames it over `target` (a folder is swapped with two
   renames: the old one aside as `.NAME.old-PID`, the new one in, the old one removed);
   `discard_temporary(tmp)` removes it instead.

`atomic_output(target)` is the three steps as a context manager: on any exception (Ctrl-C
included) the temporary is removed and `target` is left as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TEMP_TAG = ".tmp-"  # `.NAME.tmp-PID-RANDOM`
OLD_TAG = ".old-"  # `.NAME.old-PID`: a replaced folder, between the two renames of a swap


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """chmod `path` to what a plain `open`/`mkdir` would have made: 0o666 (0o777 for a folder) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def temporary_name(target: str | os.PathLike) -> Path:
    """A fresh name beside `target` for building it: `.NAME.tmp-PID-RANDOM`."""
    target = Path(target)
    return target.parent / f".{target.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def new_temporary(target: str | os.PathLike, directory: bool = False) -> Path:
    """Create an empty file (or folder) beside `target` under a fresh temporary name, and return its path."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(target)
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # a name drawn twice: draw again
            continue


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or every file in a folder tree and the folders themselves, to the disk."""
    path = Path(path)
    if path.is_dir():
        for sub in sorted(path.rglob("*")):
            if sub.is_file() and not sub.is_symlink():
                fsync_path(sub)
        _fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_temporary(tmp: str | os.PathLike, target: str | os.PathLike, fsync: bool = True) -> Path:
    """Move a finished temporary over `target` (fsynced, umask permissions); returns `target`."""
    tmp, target = Path(tmp), Path(target)
    directory = tmp.is_dir()
    give_default_mode(tmp, directory=directory)
    if fsync:
        fsync_path(tmp)
    if directory and target.exists():
        old = target.parent / f".{target.name}{OLD_TAG}{os.getpid()}"
        remove_path(old)
        os.rename(target, old)
        os.rename(tmp, target)
        remove_path(old)
    else:
        os.replace(tmp, target)
    if fsync:
        _fsync_dir(target.parent)
    return target


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, link or folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def discard_temporary(tmp: str | os.PathLike) -> None:
    """Remove a temporary that will not be committed."""
    remove_path(tmp)


@contextmanager
def atomic_output(target: str | os.PathLike, directory: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary file (or empty folder) to write; it replaces `target` when the block succeeds."""
    tmp = new_temporary(target, directory=directory)
    try:
        yield tmp
    except BaseException:
        discard_temporary(tmp)
        raise
    try:
        commit_temporary(tmp, target, fsync=fsync)
    except BaseException:
        discard_temporary(tmp)
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write `data` to `target` atomically."""
    with atomic_output(target, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"), fsync=fsync)
