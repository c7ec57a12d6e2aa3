"""Bundle manifest: schema, read, write, verify.

A bundle is a folder:

    BUNDLE/manifest.json         this schema (see `Manifest`)
    BUNDLE/<component>/...       model.onnx + model.onnx.data per component, and its TensorRT plans
                                 (a bundle built with `--target trt` holds plans only: `onnx` is null)
    BUNDLE/tokenizer/...         tokenizer files for the text encoder

`manifest["files"]` lists every file of the bundle with its size and sha256, so
`verify_bundle` can name any file that is missing, truncated or corrupted.
"""

from __future__ import annotations

import json
import os
import posixpath
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

from .digests import cached_sha256, hash_and_remember
from .errors import BundleError
from .files import atomic_output
from .limits import first_out_of_range
from .model import EXPERT_NAMES, FAMILIES, TASKS, DiTConfig, LoraRecord, SamplingDefaults, VAEInfo
from .plans import PlanInfo
from .schema import JsonLimits, describe, from_json, load_json, short, to_json
from .signatures import EngineSignature

SCHEMA_VERSION = 1
FORMAT = "wanrt-bundle"
MANIFEST_NAME = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # what the runtime reads from the bundle's tokenizer folder
MANIFEST_LIMITS = JsonLimits(max_bytes=64 << 20, max_depth=32)
COMPONENT_KINDS = ("dit", "text_encoder", "image_encoder", "vae_encoder", "vae_decoder")


@dataclass
class Component:
    """One engine of the bundle."""

    name: str  # "dit", "dit_high_noise", "text_encoder", "vae_decoder", ...
    kind: str  # one of COMPONENT_KINDS
    onnx: str | None  # path relative to the bundle; None when the bundle holds only TensorRT plans (--target trt)
    signature: EngineSignature
    precision: str  # "fp32", "bf16", "fp16", "fp8", "int8"
    files: list[str] = field(default_factory=list)  # every ONNX file of this component (graphs + data; plans: `plans`)
    expert: str | None = None  # "high_noise" / "low_noise" for Wan2.2 A14B DiTs
    plans: list[PlanInfo] = field(default_factory=list)  # TensorRT plans (`engines.plans`), one per GPU/TensorRT built for
    cache_key: str = ""  # hash of the sources and options that produced the files
    attributes: dict[str, Any] = field(default_factory=dict)  # component-specific contract

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "onnx": self.onnx, "precision": self.precision}
        d.update(self.signature.to_dict())
        d.update(files=list(self.files), expert=self.expert, plans=[to_json(p) for p in self.plans], cache_key=self.cache_key)
        d["attributes"] = self.attributes
        return d

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str = MANIFEST_NAME) -> "Component":
        """Parse `components[name]`, checking the type of every field; BundleError names the bad one."""
        path = f"components.{name}"
        fields = from_json(_ComponentFields, d, where, BundleError, path)
        signature = from_json(EngineSignature, d, where, BundleError, path)
        if fields.kind not in COMPONENT_KINDS:
            raise BundleError(f"{where}: {path}.kind {fields.kind!r}: expected one of {', '.join(COMPONENT_KINDS)}")
        if fields.expert is not None and fields.expert not in EXPERT_NAMES:
            raise BundleError(f"{where}: {path}.expert {fields.expert!r}: expected one of {', '.join(EXPERT_NAMES)} or null")
        if fields.onnx is None and not fields.plans:
            raise BundleError(f"{where}: {path}: no ONNX graph (onnx is null) and no TensorRT plan; the component cannot run")
        return cls(
            name=name, kind=fields.kind, onnx=fields.onnx, signature=signature, precision=fields.precision,
            files=list(fields.files if fields.files is not None else [fields.onnx] if fields.onnx else []), expert=fields.expert,
            plans=fields.plans, cache_key=fields.cache_key, attributes=fields.attributes,
        )

    def bundle_paths(self) -> list[tuple[str, str]]:
        """(manifest field, relative path) of every file this component names."""
        where = f"components.{self.name}"
        paths = [(f"{where}.onnx", self.onnx)] if self.onnx is not None else []
        paths += [(f"{where}.files[{i}]", f) for i, f in enumerate(self.files)]
        return paths + [(f"{where}.plans[{i}].path", plan.path) for i, plan in enumerate(self.plans)]


@dataclass(frozen=True)
class _ComponentFields:
    """The JSON fields of a component besides its signature (types for `from_json`)."""

    kind: str
    onnx: str | None
    precision: str
    files: list[str] | None = None
    expert: str | None = None
    plans: list[PlanInfo] = field(default_factory=list)
    cache_key: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry:
    """One `files` entry: size in bytes and sha256 (64 lowercase hex digits)."""

    size: int
    sha256: str


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
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Parse a manifest, checking every field's type and value; BundleError names the first bad one."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: manifest must be a JSON object, got {describe(d)}")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: not a wanrt bundle manifest (format={short(d.get('format'))}, expected {FORMAT!r})")
        version = d.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: unknown schema_version {short(version)}; this wanrt reads schema {SCHEMA_VERSION}"
                " (rebuild the bundle with this version of wanrt)"
            )
        # components and files have their own JSON forms, parsed below
        top = from_json(cls, {**d, "components": {}, "files": {}}, where, BundleError)
        bad = first_out_of_range(top.sampling.to_dict())
        if bad is not None:
            field_name, value, rng = bad
            raise BundleError(f"{where}: sampling.{field_name}: expected {rng.expected()}, got {short(value)}")
        if top.family not in FAMILIES or top.task not in TASKS:
            raise BundleError(f"{where}: family/task {top.family!r}/{top.task!r} not in {FAMILIES}/{TASKS}")
        if not isinstance(d["components"], dict) or not d["components"]:
            raise BundleError(f"{where}: components: expected an object naming at least one component, got {describe(d['components'])}")
        components = {n: Component.from_dict(n, c, where) for n, c in d["components"].items()}
        files = from_json(dict[str, FileEntry], d.get("files", {}), where, BundleError, "files")
        for rel, entry in files.items():
            if entry.size < 0 or not _is_sha256(entry.sha256):
                raise BundleError(f"{where}: files.{rel}: expected a size >= 0 and a 64-digit hex sha256, got {entry.size}, {short(entry.sha256)}")
        top.components = components
        top.files = {rel: {"size": e.size, "sha256": e.sha256} for rel, e in files.items()}
        return top

    def bundle_paths(self) -> list[tuple[str, str]]:
        """(manifest field, relative path) of every path the manifest names, files the runtime reads included."""
        paths = [p for comp in self.components.values() for p in comp.bundle_paths()]
        if self.tokenizer is not None:
            paths += [("tokenizer", self.tokenizer), ("tokenizer", tokenizer_file(self.tokenizer))]
        return paths + [("files key", rel) for rel in self.files]

    def runtime_files(self) -> set[str]:
        """Every file the runtime opens: each component's files, onnx and plans, and the tokenizer's tokenizer.json."""
        rels = {rel for field_name, rel in self.bundle_paths() if field_name != "files key"}
        return rels - ({self.tokenizer} if self.tokenizer is not None else set())


def tokenizer_file(tokenizer_dir: str) -> str:
    """The tokenizer file the runtime reads, relative to the bundle."""
    return posixpath.join(tokenizer_dir, TOKENIZER_FILE)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def check_bundle_path(root: Path, field_name: str, rel: str, where: str) -> None:
    """BundleError unless `rel` is a relative, normalized path that resolves (symlinks included) inside `root`."""
    problem = None
    if not rel:
        problem = "is empty"
    elif "\\" in rel or "\0" in rel or PureWindowsPath(rel).drive:
        problem = "holds a backslash, NUL or drive letter"
    elif posixpath.isabs(rel):
        problem = "is absolute"
    elif posixpath.normpath(rel) != rel or any(part in ("", ".", "..") for part in rel.split("/")):
        problem = "is not a normalized path inside the bundle"
    else:
        real_root = root.resolve()
        resolved = (root / rel).resolve()
        if resolved != real_root and real_root not in resolved.parents:
            problem = f"resolves to {resolved}, outside the bundle (a symbolic link?)"
    if problem:
        raise BundleError(f"{where}: {field_name} {short(rel, 200)} {problem}; a bundle may only name files inside itself")


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Read and parse `BUNDLE/manifest.json`; BundleError names what is wrong."""
    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a bundle folder (it does not exist or is not a directory)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle} is not a wanrt bundle")
    try:
        size = path.stat().st_size
        if size > MANIFEST_LIMITS.max_bytes:
            raise BundleError(f"{path}: {size} bytes, more than the {MANIFEST_LIMITS.max_bytes} a manifest may have")
        raw = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: unreadable manifest ({e.strerror})") from None
    manifest = Manifest.from_dict(load_json(raw, str(path), BundleError, MANIFEST_LIMITS), str(path))
    for field_name, rel in manifest.bundle_paths():  # before any file the manifest names is opened
        check_bundle_path(Path(bundle), field_name, rel, str(path))
    return manifest


def verify_bundle(bundle: str | os.PathLike, check_hashes: bool = True, remembered: bool = False) -> Manifest:
    """Check the schema and every listed file (existence, size, sha256); raise BundleError naming each problem.

    With `remembered`, a file whose state (inode, size, mtime) was hashed before is not read
    again (`engines.digests`); `run` uses that, `verify` reads every byte.
    """
    root = Path(bundle)
    manifest = read_manifest(root)
    problems: list[str] = []
    for rel in sorted(manifest.runtime_files() - set(manifest.files)):
        problems.append(f"{rel}: read by the runtime but not listed (with its sha256) in manifest files")
    for rel in unlisted_files(root, manifest):
        # an ONNX graph may name external data files itself: only listed (hashed) files may exist to be read
        problems.append(f"{rel}: in the bundle but not listed in manifest files (remove it or rebuild the bundle)")
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


def unlisted_files(root: Path, manifest: Manifest) -> list[str]:
    """Files and links inside the bundle folder that the manifest does not list (manifest.json aside).

    A link that leaves the bundle is a BundleError whether it is listed or not.
    """
    real_root = root.resolve()
    found = []
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if target != real_root and real_root not in target.parents:
                    raise BundleError(f"{path}: a symbolic link to {target}, outside the bundle; a bundle may only name files inside itself")
            if name in names:
                rel = path.relative_to(root).as_posix()
                if rel != MANIFEST_NAME and rel not in manifest.files:
                    found.append(rel)
    return sorted(found)


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
        if comp.onnx is not None:
            rels.add(comp.onnx)
        rels.update(plan.path for plan in comp.plans)
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
        value = load_json(p.read_bytes(), str(p), BundleError, MANIFEST_LIMITS)
    except (OSError, BundleError):
        return False
    return isinstance(value, dict) and value.get("format") == FORMAT


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
