"""Helpers shared by the export-side tests: the CLI run in-process, and its one-line error contract."""

from __future__ import annotations

import json
from dataclasses import dataclass

from click.testing import CliRunner


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_cli(*args: str) -> CliResult:
    """Run `python cli.py ARGS` in-process (the real click group, lazy command loading included)."""
    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


def assert_one_line_error(args, *needles: str) -> str:
    r = run_cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]
