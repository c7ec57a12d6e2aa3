"""The README's set-up commands: the test command is what CI runs; the main job runs for real.

The main job builds real bundles from tiny real-layout checkpoints (ONNX exports of every component),
then generates with the torch-free runtime (the image-to-video job is in test_cli_image_to_video.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import cli, frame_count

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_blocks() -> list[str]:
    """The fenced code blocks of the README's set-up section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```\n(.*?)```", section, re.S)]


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    demo, tests = readme_blocks()
    assert demo.startswith('pip install ".[export]" && python cli.py make-tiny-model ')
    assert tests.startswith("pip install ") and "python -m pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text()


def test_readme_main_job_runs_to_an_mp4(tmp_path):
    """The README's demo, command by command (minus `pip install`), with its paths moved under tmp_path."""
    demo, _ = readme_blocks()
    steps = [shlex.split(s.replace("/tmp/wanrt-demo", str(tmp_path))) for s in demo.split(" && ")]
    assert steps[0][:2] == ["pip", "install"]
    env = {**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache")}
    for argv in steps[1:]:
        assert argv[:2] == ["python", "cli.py"]
        result = cli(*argv[2:], env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    run = steps[-1]
    out = Path(run[run.index("-o") + 1])
    frames = int(run[run.index("--frames") + 1])
    size = (int(run[run.index("--width") + 1]), int(run[run.index("--height") + 1]))
    assert frame_count(out)[:3] == (frames, *size) and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    manifest = json.loads((out.parent / "bundle" / "manifest.json").read_text())
    assert {"dit_high_noise", "dit_low_noise", "text_encoder", "vae_decoder"} <= set(manifest["components"])
