"""`python cli.py inspect PATH [--config CFG] [--json]`: headers only, no tensor data is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .resolve import ResolvedModel, resolve_model


def config_loras(m: ResolvedModel) -> list[dict[str, Any]]:
    """The config's LoRAs checked as `convert` checks them, from headers: one record per LoRA and expert it patches.

    LoraError for a malformed `lora_configs` entry, a missing or unreadable file, or a LoRA
    whose keys patch nothing in an expert it targets."""
    if not m.config or not (m.config.get("lora_configs") or m.config.get("lora_path")):
        return []
    from wanrt.export.lora import loras_from_config, resolve_lora_file

    records = []
    for spec in loras_from_config(m.config, m.config_path):
        for expert in m.experts:
            if spec.expert not in (None, expert.name):
                continue
            _, keys, terms = resolve_lora_file(spec, expert.view.keys())
            targets = {t.target for t in terms.low_rank} | {t.target for t in terms.deltas}
            records.append({
                "path": str(spec.path), "strength": spec.strength, "expert": expert.name, "keys": len(keys),
                "patched_tensors": len(targets), "skipped_keys": len(terms.unmatched),
            })  # fmt: skip
    return records


def _human(m: ResolvedModel, loras: list[dict[str, Any]]) -> str:
    d = m.dit
    lines = [f"{m.family} {m.task}  ({m.source})"]
    for e in m.experts:
        scale = f", {e.view.scale} scale" if e.view.scale else ""
        pair = f" ({m.lone_expert} expert of a Wan2.2 A14B pair)" if e.name == "dit" and m.lone_expert else ""
        lines.append(
            f"  expert {e.name}{pair}: {e.layout} layout, {e.view.precision}{scale}, "
            f"{e.view.num_params / 1e9:.3f} B params in {len(e.files)} file(s)"
        )
        for f in e.files[:4]:
            lines.append(f"    {f}")
        if len(e.files) > 4:
            lines.append(f"    ... {len(e.files) - 4} more")
    image = f", image branch (CLIP {d.clip_dim}, {d.clip_tokens} tokens)" if d.image_branch else ""
    image += f", {len(d.vace_layers)} VACE blocks at layers {list(d.vace_layers)} (control in {d.vace_in_dim})" if d.vace else ""
    lines.append(
        f"  dit: dim {d.dim}, ffn {d.ffn_dim}, {d.num_heads} heads, {d.num_layers} layers, in {d.in_dim}, "
        f"out {d.out_dim}, text {d.text_dim}, freq {d.freq_dim}{image}"
    )
    if d.animate is not None:
        a = d.animate
        adapters = a.adapters(d.num_layers)
        lines.append(
            f"  animate: pose patch embedding ({a.pose_dim} ch), motion encoder ({a.motion_size} px faces, "
            f"{a.motion_res_blocks} res blocks, {a.motion_dim} directions -> {a.motion_out_dim}), face encoder "
            f"({a.face_heads} heads x {a.face_hidden_dim}), face adapter ({adapters} blocks after DiT blocks "
            f"0, {a.adapter_every}, ...)"
        )
    lines.append(f"  text encoder: {m.text_encoder or '-'}")
    lines.append(f"  tokenizer:    {m.tokenizer or '-'}")
    if m.dit.image_branch or m.image_encoder:
        lines.append(f"  image encoder: {m.image_encoder or '-'}")
    lines.append(f"  vae:          {m.vae or '-'}" + (f" (Wan{m.vae_version})" if m.vae_version else ""))
    s = m.sampling
    cfg = "on" if s.enable_cfg else "off"
    guide = f"guide (low, high) {s.guide_scale[0]:g}/{s.guide_scale[1]:g}"
    extra = f", boundary {s.boundary}" if s.boundary is not None else ""
    extra += f", boundary step {s.boundary_step_index}" if s.boundary_step_index is not None else ""
    lines.append(
        f"  sampling: {s.sampler}, {s.steps} steps, shift {s.shift:g}, {guide}, cfg {cfg}{extra}, "
        f"{s.frames} frames {s.width}x{s.height} @ {s.fps} fps"
    )
    for r in loras:
        lines.append(f"  lora: {r['path']} x{r['strength']:g} patches {r['patched_tensors']} tensors of {r['expert']}"
                     + (f" ({r['skipped_keys']} keys match nothing)" if r["skipped_keys"] else ""))  # fmt: skip
    for n in m.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="LightX2V JSON config (// comments allowed) choosing checkpoint files and sampling settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable description.")
def inspect_command(path: Path, config: Path | None, as_json: bool) -> None:
    """Detect a Wan checkpoint's layout, precision, architecture and companion files (headers only)."""
    model = resolve_model(path, config)
    loras = config_loras(model)
    if as_json:
        click.echo(json.dumps({**model.to_json(), "config_loras": loras}, indent=2, ensure_ascii=False))
    else:
        click.echo(_human(model, loras))
