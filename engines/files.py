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
included) the temporary is removed and `target` is left as it was.  A full disk, a quota, a
file-size limit or an I/O error while writing becomes one `DiskError` naming the target and the
bytes needed (`disk_error`).

Temporaries are named after the process that owns them, so one left by a process that was
killed (SIGKILL, a crash, a power cut) is recognised and removed by the next writer of the same
target (`remove_stale_temporaries`), with a note.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import WanrtError
from .interrupts import raise_if_interrupted

TEMP_TAG = ".tmp-"  # `.NAME.tmp-PID-RANDOM`
OLD_TAG = ".old-"  # `.NAME.old-PID`: a replaced folder, between the two renames of a swap
# errnos that mean "the disk cannot take this output" rather than "this input is wrong"
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})
log = logging.getLogger("wanrt.files")


class DiskError(WanrtError):
    """An output could not be written (disk full, quota, file-size limit, I/O error); nothing half-written remains."""

    def __init__(self, target: Path, reason: str, need: str, room: str, inner: str = "") -> None:
        where = f" while writing {inner}" if inner else ""
        super().__init__(f"{target}: cannot write it ({reason}){where}: {need}{room}; nothing was left half-written")
        self.target, self.reason, self.need, self.room = target, reason, need, room

    def within(self, tmp: Path, target: Path) -> "DiskError":
        """This error as seen from an output that contains it (`tmp` being built for `target`)."""
        try:
            inner = self.target.relative_to(tmp.absolute())
        except ValueError:
            return self
        return DiskError(target.absolute(), self.reason, self.need, self.room, str(inner))


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes allocated on disk under `path` (a file or a folder tree); 0 when it is gone."""
    path = Path(path)
    try:
        if not path.is_dir():
            return path.stat().st_blocks * 512
        return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
    except OSError:
        return 0


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding `folder` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_write_failure(error: BaseException) -> bool:
    """True for the OSErrors that mean the output cannot be written here (ENOSPC, EDQUOT, EFBIG, EIO, EROFS),
    and for a short write reported without an errno (Python's buffered writer: "N requested and M written")."""
    return isinstance(error, OSError) and (error.errno in WRITE_ERRNOS or (error.errno is None and "written" in str(error)))


def disk_error(error: OSError, target: str | os.PathLike, tmp: str | os.PathLike | None = None,
               needed_bytes: int | None = None) -> DiskError:  # fmt: skip
    """One line for a failed write: the target, the reason, the bytes needed (or written before it failed), the free space."""
    target = Path(target).absolute()
    code = errno.errorcode.get(error.errno or 0, "")
    reason = (error.strerror or str(error)) + (f", {code}" if code else "")
    written = tree_bytes(tmp) if tmp is not None else 0
    if needed_bytes is not None:
        need = f"{needed_bytes} bytes needed"
    else:
        need = f"more than the {written} bytes written before it failed" if written else "its size was not known ahead"
    free = free_bytes(target.parent if target.parent.exists() else Path.cwd())
    room = f", {free} bytes free there" if free is not None else ""
    return DiskError(target, reason, need, room)


def as_disk_error(error: BaseException, target: str | os.PathLike, tmp: str | os.PathLike,
                  needed_bytes: int | None = None) -> DiskError | None:  # fmt: skip
    """What a failure while building `tmp` for `target` means for `target`: a DiskError naming it (measured
    before `tmp` is removed), or None when the failure is not about room on the disk."""
    if is_write_failure(error):
        return disk_error(error, target, tmp, needed_bytes)
    if isinstance(error, DiskError):  # a writer inside this output ran out of room: name this output, and that file in it
        return error.within(Path(tmp), Path(target))
    return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` beside `target` whose PID no longer runs; returns what was removed.

    Only names of exactly our form, for this target, are touched; a live owner's are kept.
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}(?:{re.escape(TEMP_TAG)}(\d+)-[0-9a-f]{{8}}|{re.escape(OLD_TAG)}(\d+))$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _pid_running(pid):
            continue
        remove_path(entry)
        removed.append(entry)
        log.warning("note: removed %s, left by process %d that no longer runs (killed while writing %s)",
                    entry.absolute(), pid, target.absolute())
    return removed


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
    remove_stale_temporaries(target)
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
    """Move a finished temporary over `target` (fsynced, umask permissions); returns `target`.

    An interrupted process commits nothing: a Ctrl-C or SIGTERM whose KeyboardInterrupt was lost is
    raised here (`interrupts.raise_if_interrupted`).
    """
    raise_if_interrupted()
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
def atomic_output(
    target: str | os.PathLike, directory: bool = False, fsync: bool = True, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary file (or empty folder) to write; it replaces `target` when the block succeeds.

    A write failure (`is_write_failure`) in the block or the commit is re-raised as a DiskError
    naming `target` and `needed_bytes` (when the caller knows it) after the temporary is removed.
    """
    try:
        tmp = new_temporary(target, directory=directory)
    except OSError as e:
        if is_write_failure(e):
            raise disk_error(e, target, None, needed_bytes) from None
        raise
    try:
        yield tmp
        commit_temporary(tmp, target, fsync=fsync)
    except BaseException as e:
        failure = as_disk_error(e, target, tmp, needed_bytes)
        discard_temporary(tmp)
        if failure is not None:
            raise failure from None
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write `data` to `target` atomically."""
    with atomic_output(target, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"), fsync=fsync)
