"""Helpers shared by the end-to-end CLI tests: run `python cli.py` from the checkout, read an mp4 back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, env=env, capture_output=True, text=True)


def frame_count(mp4: Path) -> tuple[int, int, int, float]:
    """(frames, width, height, fps) read back from an mp4."""
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(video=0))
        return n, stream.width, stream.height, float(stream.average_rate)
