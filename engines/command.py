"""`cli.py verify BUNDLE`."""

from __future__ import annotations

import json

import click

from .manifest import verify_bundle


@click.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="Check existence and sizes only, not sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def verify_command(bundle: str, quick: bool, as_json: bool) -> None:
    """Check a bundle's schema and every file it lists; name each missing or corrupted file."""
    m = verify_bundle(bundle, check_hashes=not quick)
    summary = {
        "bundle": bundle,
        "ok": True,
        "schema_version": m.schema_version,
        "family": m.family,
        "task": m.task,
        "components": sorted(m.components),
        "files": len(m.files),
        "bytes": sum(f["size"] for f in m.files.values()),
        "hashes_checked": not quick,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"{bundle}: OK ({m.family} {m.task}, components {', '.join(summary['components'])}; "
            f"{summary['files']} files, {summary['bytes'] / 1e6:.1f} MB{', sha256 checked' if not quick else ''})"
        )
