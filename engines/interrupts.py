"""Ctrl-C and SIGTERM that are never lost: an interrupted process commits no output.

Python runs a signal's handler in the main thread and raises its KeyboardInterrupt wherever that
thread is.  C code that clears pending errors can drop that exception without a trace (CPython
3.11's `PyObject_HasAttr` and `PyDict_GetItem`, the error paths of extension modules): a build
SIGINT'd while torch imported its exporter ran on to the end and exited 0, with the bundle in
place.  The handlers `install_handlers` sets also record the signal, and `commit_temporary`
(engines.files) calls `raise_if_interrupted` before every commit, so a lost KeyboardInterrupt is
raised again there, where the writers' cleanup removes what was half-written.  A signal that lands
inside an import is raised once the import is done (`REDELIVER_SECONDS`).

The record is process state by nature (a signal belongs to the process); only the commands'
entry point installs the handlers, so in-process callers (tests, `CliRunner`) keep their own.
"""

from __future__ import annotations

import _thread
import signal
import threading
from types import FrameType

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A signal that arrives during an import is raised again this much later, once the import is done: an exception
# thrown out of an extension module's initialisation aborts the process (SIGABRT; seen with triton's libtriton,
# which torch's exporter imports, under a SIGINT'd build-engine).
REDELIVER_SECONDS = 0.05
_received: list[int] = []  # the signals the handlers of `install_handlers` have seen, in order


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs (what `timeout`,
    `docker stop` and process managers send)."""

    exit_code = 128 + signal.SIGTERM
    message = "terminated (SIGTERM)"


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a signal raises: Terminated for SIGTERM, KeyboardInterrupt for SIGINT."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def on_signal(signum: int, frame: FrameType | None) -> None:
    """Record the signal, then raise its exception in the main thread; during an import, a moment after it."""
    if signum not in _received:
        _received.append(signum)
    if importing(frame):
        threading.Timer(REDELIVER_SECONDS, _thread.interrupt_main, (signum,)).start()
        return
    raise interrupt_for(signum)


def importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib's frozen bootstrap is on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib."):
            return True
        frame = frame.f_back
    return False


def install_handlers() -> None:
    """Handle SIGINT and SIGTERM with `on_signal` (call once, from the main thread, at start-up)."""
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, on_signal)


def raise_if_interrupted() -> None:
    """Raise the first recorded signal's exception again, if the process was interrupted."""
    if _received:
        raise interrupt_for(_received[0])
