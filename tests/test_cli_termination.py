"""SIGTERM, Ctrl-C, SIGKILL and full disks, on real `python cli.py` processes.

- SIGTERM is handled as Ctrl-C: exit 143, one line, no temporary left, no output.
- Ctrl-C while a command is still importing (torch) ends with 130 and our line, not click's
  "Aborted!" and exit 1.
- A temporary left by a SIGKILLed writer is removed by the next writer of the same target, with a note.
- A write that fails for lack of room (here: a real EFBIG from the kernel under RLIMIT_FSIZE, the
  one full-disk error an unprivileged test can cause) is one line naming the output, exit 2,
  and nothing half-written.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def start(args, cwd, limit_bytes: int | None = None) -> subprocess.Popen:
    def limit():  # Python ignores SIGXFSZ, so an over-limit write fails with EFBIG instead of killing the process
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)  # fmt: skip


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_sigterm_while_writing_removes_the_temporary_and_exits_143(tmp_path):
    proc = start(["make-tiny-model", "model", "--family", "wan2.1", "--task", "t2v"], tmp_path)
    wait_for(lambda: temporaries(tmp_path) != [])  # the model is being written under its temporary name
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert temporaries(tmp_path) == [] and not (tmp_path / "model").exists()


def test_ctrl_c_during_start_up_imports_is_not_swallowed(tmp_path, tiny_model_folder):
    proc = start(["build-engine", tiny_model_folder, "-o", tmp_path / "bundle"], tmp_path)
    maps = Path(f"/proc/{proc.pid}/maps")
    wait_for(lambda: proc.poll() is not None or "libtorch" in maps.read_text(errors="replace"))  # torch is importing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Aborted!" not in err and "Traceback" not in err, err
    assert temporaries(tmp_path) == [] and not (tmp_path / "bundle").exists()


def test_a_sigkilled_writers_temporary_is_removed_by_the_next_writer(tmp_path):
    args = ["make-tiny-model", "model", "--family", "wan2.1", "--task", "t2v"]
    proc = start(args, tmp_path)
    wait_for(lambda: temporaries(tmp_path) != [])
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = temporaries(tmp_path)
    assert f".tmp-{proc.pid}-" in left  # named after its (now dead) owner
    again = start(args, tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"note: removed {tmp_path / left}, left by process {proc.pid} that no longer runs" in err, err
    assert temporaries(tmp_path) == [] and (tmp_path / "model").is_dir()


def test_a_live_writers_temporary_is_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = tmp_path / f".model.tmp-{live.pid}-0123abcd"
        keep.mkdir()
        proc = start(["make-tiny-model", "model", "--family", "wan2.1", "--task", "t2v"], tmp_path)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "note: removed" not in err, err
        assert keep.is_dir()
    finally:
        live.kill()
        live.wait()


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("disk")
    out = subprocess.run([sys.executable, str(REPO / "cli.py"), "make-tiny-model", folder / "model", "--family", "wan2.1",
                          "--task", "t2v"], capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return folder / "model"


def assert_one_disk_error(proc: subprocess.Popen, output: Path) -> str:
    _, err = proc.communicate(timeout=600)
    lines = error_lines(err)
    assert proc.returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(output) in lines[0] and "nothing was left half-written" in lines[0], lines[0]
    # EFBIG, or the short write Python's buffered writer reports for it
    assert "File too large" in lines[0] or re.search(r"\d+ requested and \d+ written", lines[0]), lines[0]
    assert temporaries(output.parent) == [] and not output.exists()
    return lines[0]


def test_a_full_disk_while_making_a_model(tmp_path):
    proc = start(["make-tiny-model", "model", "--family", "wan2.1", "--task", "t2v"], tmp_path, limit_bytes=1 << 20)
    assert_one_disk_error(proc, tmp_path / "model")


def test_a_full_disk_while_converting_names_the_bytes_needed(tmp_path, tiny_model_folder):
    out = tmp_path / "out.safetensors"
    proc = start(["convert", tiny_model_folder, "-o", out], tmp_path, limit_bytes=1 << 20)
    line = assert_one_disk_error(proc, out)
    needed = int(line.split(" bytes needed")[0].rsplit(" ", 1)[1])
    assert needed > 1 << 20  # the whole file's size, known before writing


def test_a_full_disk_while_exporting_onnx(tmp_path, tiny_model_folder):
    out = tmp_path / "bundle"
    proc = start(["build-engine", tiny_model_folder, "-o", out, "--precision", "fp32"], tmp_path, limit_bytes=2 << 20)
    line = assert_one_disk_error(proc, out)
    assert re.search(r"while writing \w+/model\.onnx: \d+ bytes needed", line), line


_WRITE_VIDEO = """
import sys
import cli
import numpy as np
from wanrt.engines.errors import WanrtError
from wanrt.runtime.video import write_mp4, write_png_frames
frames = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)  # noise: incompressible
try:
    write_mp4(frames, sys.argv[1], 16) if sys.argv[1].endswith(".mp4") else write_png_frames(frames, sys.argv[1])
except WanrtError as e:
    print(f"error: {e}")
"""


@pytest.mark.parametrize("name", ["out.mp4", "frames"])
def test_a_full_disk_while_writing_the_video(tmp_path, name):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))

    out = subprocess.run([sys.executable, "-c", _WRITE_VIDEO, str(tmp_path / name)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, preexec_fn=limit, timeout=120)  # fmt: skip
    (line,) = error_lines(out.stdout)
    assert str(tmp_path / name) in line and "nothing was left half-written" in line, out.stdout + out.stderr
    assert temporaries(tmp_path) == [] and not (tmp_path / name).exists()
