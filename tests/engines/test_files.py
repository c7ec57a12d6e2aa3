"""engines.files: outputs appear whole under their name or not at all, with umask permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wanrt.engines.files import atomic_output, atomic_write_text, new_temporary

REPO = Path(__file__).resolve().parents[2]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_file_replaces_target_only_when_complete(tmp_path, umask_027):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old" and tmp.parent == tmp_path
        assert tmp.name.startswith(f".out.bin.tmp-{os.getpid()}-")
    assert target.read_bytes() == b"new" and mode(target) == 0o640 and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_error_or_ctrl_c_leaves_target_untouched_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise error()
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    with pytest.raises(error):
        with atomic_output(tmp_path / "fresh", directory=True) as tmp:
            (tmp / "a").write_text("x")
            raise error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_folder_swap_replaces_old_folder_and_file(tmp_path, umask_027):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "stale").write_text("old")
    with atomic_output(target, directory=True) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "manifest.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["manifest.json"] and mode(target) == 0o750
    assert leftovers(tmp_path) == []
    # a folder can also replace a plain file (what --force over a file asks for)
    other = tmp_path / "was_a_file"
    other.write_text("x")
    with atomic_output(other, directory=True) as tmp:
        (tmp / "f").write_text("y")
    assert other.is_dir() and (other / "f").read_text() == "y" and leftovers(tmp_path) == []


def test_missing_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "hi")
    assert target.read_text() == "hi"


def test_temporary_names_are_unique_and_exclusive(tmp_path):
    made = {new_temporary(tmp_path / "x") for _ in range(50)}
    assert len(made) == 50 and all(p.is_file() and p.stat().st_size == 0 for p in made)


def test_sigkill_mid_write_leaves_only_a_named_temporary(tmp_path):
    """A killed writer never leaves a partial target: only `.NAME.tmp-PID-*`, naming the dead process."""
    target = tmp_path / "video.mp4"
    code = (
        "import os, signal, cli\n"
        "from wanrt.engines.files import atomic_output\n"
        f"with atomic_output({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert proc.returncode == -9
    assert not target.exists()
    (left,) = leftovers(tmp_path)
    assert left.startswith(".video.mp4.tmp-") and left.split(".tmp-")[1].split("-")[0].isdigit()
