"""Bundle manifest: schema, read, write, verify.

A bundle is a folder:

    BUNDLE/manifest.json         this schema (see `Manifest`)
    BUNDLE/<component>/...       model.onnx + model.onnx.data per component (plans later)
    BUNDLE/tokenizer/...         tokenizer files for the text encoder

`manifest["files"]` lists every file of the bundle with its size and sha256, so
`verify_bundle` can name any file that is missing, truncated or corrupted.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .digests import cached_sha256, hash_and_remember
from .errors import BundleError
from .files import atomic_output
from .model import FAMILIES, TASKS, DiTConfig, LoraRecord, SamplingDefaults, VAEInfo
from .signatures import EngineSignature

SCHEMA_VERSION = 1
FORMAT = "wanrt-bundle"
MANIFEST_NAME = "manifest.json"
COMPONENT_KINDS = ("dit", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder")


@dataclass
class Component:
    """One engine of the bundle."""

    name: str  # "dit", "dit_high_noise", "text_encoder", "vae_decoder", ...
    kind: str  # one of COMPONENT_KINDS
    onnx: str  # path relative to the bundle
    signature: EngineSignature
    precision: str  # "fp32", "bf16", "fp16", "fp8", "int8"
    files: list[str] = field(default_factory=list)  # every file of this component (onnx + data)
    expert: str | None = None  # "high_noise" / "low_noise" for Wan2.2 A14B DiTs
    plan: str | None = None  # TensorRT plan, relative path, when built
    cache_key: str = ""  # hash of the sources and options that produced the files
    attributes: dict[str, Any] = field(default_factory=dict)  # component-specific contract

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "onnx": self.onnx, "precision": self.precision}
        d.update(self.signature.to_dict())
        d.update(files=list(self.files), expert=self.expert, plan=self.plan, cache_key=self.cache_key)
        d["attributes"] = self.attributes
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "Component":
        return cls(
            name=name,
            kind=d["kind"],
            onnx=d["onnx"],
            signature=EngineSignature.from_dict(d),
            precision=d["precision"],
            files=list(d.get("files", [d["onnx"]])),
            expert=d.get("expert"),
            plan=d.get("plan"),
            cache_key=d.get("cache_key", ""),
            attributes=dict(d.get("attributes", {})),
        )


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle."""

    family: str
    task: str
    dit: DiTConfig
    vae: VAEInfo
    components: dict[str, Component]
    sampling: SamplingDefaults
    precision: str = "fp32"
    tokenizer: str | None = None  # folder relative to the bundle
    loras: list[LoraRecord] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # model path, layout, config file
    producer: dict[str, str] = field(default_factory=dict)  # tool versions
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {size, sha256}
    schema_version: int = SCHEMA_VERSION

    @property
    def experts(self) -> list[str]:
        """DiT component names, high-noise first."""
        dits = [c for c in self.components.values() if c.kind == "dit"]
        order = {"high_noise": 0, None: 1, "low_noise": 2}
        return [c.name for c in sorted(dits, key=lambda c: order.get(c.expert, 1))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "family": self.family,
            "task": self.task,
            "precision": self.precision,
            "dit": self.dit.to_dict(),
            "vae": {"version": self.vae.version, "z_dim": self.vae.z_dim, "stride": list(self.vae.stride)},
            "components": {n: c.to_dict() for n, c in self.components.items()},
            "sampling": self.sampling.to_dict(),
            "tokenizer": self.tokenizer,
            "loras": [vars(l) for l in self.loras],
            "source": self.source,
            "producer": self.producer,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: not a wanrt bundle manifest (format={d.get('format')!r}, expected {FORMAT!r})")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: unknown schema_version {version!r}; this wanrt reads schema {SCHEMA_VERSION}"
                " (rebuild the bundle with this version of wanrt)"
            )
        try:
            if d["family"] not in FAMILIES or d["task"] not in TASKS:
                raise BundleError(f"{where}: family/task {d['family']!r}/{d['task']!r} not in {FAMILIES}/{TASKS}")
            vae = d["vae"]
            return cls(
                family=d["family"],
                task=d["task"],
                precision=d.get("precision", "fp32"),
                dit=DiTConfig.from_dict(d["dit"]),
                vae=VAEInfo(vae["version"], int(vae["z_dim"]), tuple(vae["stride"])),
                components={n: Component.from_dict(n, c) for n, c in d["components"].items()},
                sampling=SamplingDefaults.from_dict(d["sampling"]),
                tokenizer=d.get("tokenizer"),
                loras=[LoraRecord(**l) for l in d.get("loras", [])],
                source=dict(d.get("source", {})),
                producer=dict(d.get("producer", {})),
                files=dict(d.get("files", {})),
                schema_version=version,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Read and parse `BUNDLE/manifest.json`; BundleError names what is wrong."""
    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle folder (it does not exist or is not a directory)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle} is not a wanrt bundle")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    return Manifest.from_dict(data, str(path))


def verify_bundle(bundle: str | os.PathLike, check_hashes: bool = True, remembered: bool = False) -> Manifest:
    """Check the schema and every listed file (existence, size, sha256); raise BundleError naming each problem.

    With `remembered`, a file whose state (inode, size, mtime) was hashed before is not read
    again (`engines.digests`); `run` uses that, `verify` reads every byte.
    """
    root = Path(bundle)
    manifest = read_manifest(root)
    problems: list[str] = []
    referenced = set()
    for comp in manifest.components.values():
        referenced.update(comp.files)
        referenced.add(comp.onnx)
        if comp.plan:
            referenced.add(comp.plan)
    for rel in sorted(referenced - set(manifest.files)):
        problems.append(f"{rel}: referenced by a component but not listed in manifest files")
    to_hash = []
    for rel, meta in sorted(manifest.files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != meta.get("size"):
            problems.append(f"{path}: size {size} bytes, manifest says {meta.get('size')} (truncated or replaced)")
        elif check_hashes:
            to_hash.append((path, meta.get("sha256")))
    digests = hash_and_remember([p for p, _ in to_hash], use_remembered=remembered)
    for path, want in to_hash:
        if digests[str(path)] != want:
            problems.append(f"{path}: sha256 mismatch (corrupted or modified)")
    if problems:
        raise BundleError(f"{root}: bundle verification failed: " + "; ".join(problems))
    return manifest


def list_files(root: str | os.PathLike, rels: list[str]) -> dict[str, dict[str, Any]]:
    """`{relpath: {size, sha256}}` for the given files under `root`."""
    root = Path(root)
    # remembered: files carried over by hard link are not read again, and the first `run` need not hash any
    digests = cached_sha256([root / rel for rel in sorted(rels)])
    return {rel: {"size": (root / rel).stat().st_size, "sha256": digests[str(root / rel)]} for rel in sorted(rels)}


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Hash every component and tokenizer file, then write `manifest.json` under `root`."""
    root = Path(root)
    rels: set[str] = set()
    for comp in manifest.components.values():
        rels.update(comp.files)
        rels.add(comp.onnx)
        if comp.plan:
            rels.add(comp.plan)
    if manifest.tokenizer:
        tok = root / manifest.tokenizer
        rels.update(str(p.relative_to(root)) for p in tok.rglob("*") if p.is_file())
    manifest.files = list_files(root, sorted(rels))
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")


def is_bundle(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a wanrt manifest (of any schema version)."""
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_empty_dir(path: Path) -> bool:
    """True for a folder with nothing in it (what `mkdir OUT` leaves)."""
    return path.is_dir() and next(path.iterdir(), None) is None


def staging_dir(target: str | os.PathLike, force: bool = False) -> AbstractContextManager[Path]:
    """A temporary folder beside `target` (`engines.files.atomic_output`); on success it replaces `target`.

    An existing `target` is replaced only if it is a bundle, an empty folder, or `force` is set;
    on any error the temporary folder is removed and `target` is left as it was. Replacing is
    two renames (old aside, new in place): a crash between them leaves the finished bundle at
    `.NAME.tmp-*` and the old one at `.NAME.old-PID`, never a half-written `target`.
    """
    target = Path(target).absolute()
    if target.exists() and not (force or is_bundle(target) or _is_empty_dir(target)):
        raise BundleError(f"{target}: exists, is not empty and is not a wanrt bundle; refusing to overwrite (use --force)")
    return atomic_output(target, directory=True)
