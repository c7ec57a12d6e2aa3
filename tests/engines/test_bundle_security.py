"""A bundle can only name files inside itself; a malformed manifest is one BundleError at load.

Paths are attacked in every field that holds one (`files` keys, a component's `onnx`, `plan` and
`files[i]`, `tokenizer`), with generated hostile forms (absolute, `..` anywhere, unnormalized,
backslashes, symbolic links out of the bundle); a subprocess with an audit hook proves that no
file outside the bundle is ever opened. The manifest reader is fuzzed with random JSON values
put in random places of a valid manifest: only BundleError may come out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanrt.engines.errors import BundleError
from wanrt.engines.manifest import MANIFEST_NAME, read_manifest, verify_bundle

from .conftest import make_small_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(tmp_path) -> Path:
    make_small_bundle(tmp_path / "b")
    return tmp_path / "b"


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def write(bundle: Path, data: dict) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def outside_file(bundle: Path) -> Path:
    """A file beside the bundle with the same bytes as one inside it (a matching size and sha256)."""
    target = bundle.parent / "secret"
    target.write_bytes((bundle / "dit_low_noise" / "model.onnx.data").read_bytes())
    return target


# (field, how to put a path into a manifest dict)
def set_files_key(d, rel):
    entry = d["files"].pop("dit_low_noise/model.onnx.data")
    d["files"][rel] = entry


def set_onnx(d, rel):
    d["components"]["dit_low_noise"]["onnx"] = rel
    d["files"][rel] = d["files"]["dit_low_noise/model.onnx"]


def set_component_file(d, rel):
    d["components"]["dit_low_noise"]["files"][1] = rel
    d["files"][rel] = d["files"]["dit_low_noise/model.onnx.data"]


def set_plan(d, rel):
    d["components"]["dit_low_noise"]["plans"] = [{"path": rel, "tensorrt_version": "11.4.0.106", "compute_capability": "9.0"}]
    d["files"][rel] = d["files"]["dit_low_noise/model.onnx.data"]


def set_tokenizer(d, rel):
    d["tokenizer"] = rel


SETTERS = {
    "files key": set_files_key,
    "components.dit_low_noise.onnx": set_onnx,
    "components.dit_low_noise.files[1]": set_component_file,
    "components.dit_low_noise.plans[0].path": set_plan,
    "tokenizer": set_tokenizer,
}


def hostile_paths(bundle: Path) -> list[str]:
    secret = outside_file(bundle)
    return [
        str(secret),  # absolute
        "../secret",
        "dit_low_noise/../../secret",
        "./dit_low_noise/model.onnx.data",  # inside, but not normalized
        "dit_low_noise//model.onnx.data",
        "dit_low_noise/model.onnx.data/",
        "dit_low_noise\\..\\..\\secret",
        "C:secret",
        "",
        "/",
        "..",
    ]


@pytest.mark.parametrize("field_name", list(SETTERS))
def test_every_path_field_refuses_paths_that_leave_the_bundle(bundle, field_name):
    original = manifest_of(bundle)
    for rel in hostile_paths(bundle):
        data = json.loads(json.dumps(original))
        SETTERS[field_name](data, rel)
        write(bundle, data)
        with pytest.raises(BundleError, match="a bundle may only name files inside itself") as e:
            verify_bundle(bundle)
        assert field_name in str(e.value), (rel, str(e.value))


@given(
    parts=st.lists(
        st.sampled_from(["..", ".", "", "dit_low_noise", "model.onnx.data", "x", "..\\x", "/"]), min_size=1, max_size=6
    ),
    field_name=st.sampled_from(list(SETTERS)),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_generated_paths_are_refused_unless_normalized_and_inside(valid_manifest, parts, field_name):
    bundle, original = valid_manifest
    rel = "/".join(parts)
    data = json.loads(json.dumps(original))
    SETTERS[field_name](data, rel)
    write(bundle, data)
    normalized_inside = (
        rel and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in rel.split("/"))
    )
    try:
        read_manifest(bundle)
    except BundleError as e:
        assert not normalized_inside or "inside itself" not in str(e), (rel, str(e))
    else:
        assert normalized_inside, rel


@pytest.mark.parametrize("link_at", ["dit_low_noise/model.onnx.data", "dit_low_noise", "tokenizer/tokenizer.json"])
def test_symbolic_links_out_of_the_bundle_are_refused(bundle, link_at):
    secret_dir = bundle.parent / "elsewhere"
    real = bundle / link_at
    os.rename(real, secret_dir)  # same bytes, now outside the bundle
    os.symlink(secret_dir, real)
    with pytest.raises(BundleError, match="outside the bundle") as e:
        verify_bundle(bundle)
    assert "a bundle may only name files inside itself" in str(e.value)


def test_a_symbolic_link_that_stays_inside_is_allowed(bundle):
    data = bundle / "dit_low_noise" / "model.onnx.data"
    (bundle / "blobs").mkdir()
    os.rename(data, bundle / "blobs" / "data")
    os.symlink("../blobs/data", data)
    doc = manifest_of(bundle)
    doc["files"]["blobs/data"] = doc["files"]["dit_low_noise/model.onnx.data"]
    write(bundle, doc)
    verify_bundle(bundle)


def test_refused_outside_paths_are_never_opened(bundle):
    """An audit hook in a child process records every open(): the outside file is not among them."""
    secret = outside_file(bundle)
    data = manifest_of(bundle)
    set_component_file(data, str(secret))
    write(bundle, data)
    code = (
        "import sys, cli\n"
        "opened = []\n"
        "sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == 'open' else None)\n"
        "from wanrt.engines.manifest import verify_bundle\n"
        "from wanrt.engines.errors import BundleError\n"
        "try:\n"
        f"    verify_bundle({str(bundle)!r})\n"
        "except BundleError as e:\n"
        "    print('refused:', e)\n"
        f"print('opened secret:', any({str(secret)!r} in p for p in opened))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "refused:" in out and "inside itself" in out and "opened secret: False" in out


def test_tokenizer_file_must_be_listed_and_hashed(bundle):
    data = manifest_of(bundle)
    del data["files"]["tokenizer/tokenizer.json"]
    write(bundle, data)
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json: read by the runtime but not listed"):
        verify_bundle(bundle)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(components=list(d["components"].values())), "components: expected an object"),
        (lambda d: d.update(components={}), "components: expected an object naming at least one component"),
        (lambda d: d["files"].update({"dit_low_noise/model.onnx": "abc"}), "files.dit_low_noise/model.onnx: expected an object"),
        (lambda d: d["files"]["dit_low_noise/model.onnx"].update(size="10"), "files.dit_low_noise/model.onnx.size: expected an integer"),
        (lambda d: d["files"]["dit_low_noise/model.onnx"].update(sha256="x" * 64), "64-digit hex sha256"),
        (lambda d: d.update(schema_version=True), "unknown schema_version True"),
        (lambda d: d.update(schema_version=1.0), "unknown schema_version 1.0"),
        (lambda d: d["dit"].update(num_layers=2.5), "dit.num_layers: expected an integer, got a number 2.5"),
        (lambda d: d["dit"].update(dim=True), "dit.dim: expected an integer, got a boolean True"),
        (lambda d: d["sampling"].update(steps="4"), "sampling.steps: expected an integer"),
        (lambda d: d["sampling"].update(guide_scale=[1.0]), "sampling.guide_scale: expected a list of 2 items"),
        (lambda d: d["components"]["dit_low_noise"].update(kind="dat"), "components.dit_low_noise.kind 'dat'"),
        (lambda d: d["components"]["dit_low_noise"]["inputs"][0].update(shape={"a": 1}), "components.dit_low_noise.inputs[0].shape: expected a list"),
        (lambda d: d["components"]["dit_low_noise"].update(files=[3]), "components.dit_low_noise.files[0]: expected a string, got an integer 3"),
        (lambda d: d["loras"][0].update(strength=None), "loras[0].strength: expected a finite number, got null"),
        (lambda d: d["vae"].update(stride=[4, 8]), "vae.stride: expected a list of 3 items"),
    ],
)
def test_malformed_manifests_are_one_precise_bundle_error(bundle, change, message):
    data = manifest_of(bundle)
    change(data)
    write(bundle, data)
    with pytest.raises(BundleError) as e:
        read_manifest(bundle)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 5000 + "]" * 5000, "nested deeper than"),
        ('{"format": "wanrt-bundle", "schema_version": ' + "9" * 5000 + "}", "longer than"),
        ('{"format": "wanrt-bundle", "schema_version": NaN}', "NaN is not a JSON number"),
        ('{"format": "wanrt-bundle", "format": "x"}', "appears twice"),
        ("\xff\xfe", "not UTF-8"),
    ],
)
def test_hostile_json_is_refused_quickly(bundle, text, message):
    (bundle / MANIFEST_NAME).write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def paths_in(value, prefix=()):
    """Every (path tuple) to a value inside a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, prefix + (i,))


@pytest.fixture(scope="module")
def valid_manifest(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz") / "b"
    make_small_bundle(root)
    return root, manifest_of(root)


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_manifests_raise_only_bundle_errors(valid_manifest, data):
    root, original = valid_manifest
    doc = json.loads(json.dumps(original))
    places = [p for p in paths_in(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        place = data.draw(st.sampled_from(places))
        parent = doc
        try:
            for key in place[:-1]:
                parent = parent[key]
            parent[place[-1]] = data.draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this place
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    try:
        read_manifest(root)
    except BundleError as e:
        assert "\n" not in str(e)


def test_a_key_with_a_control_character_is_shown_quoted_on_one_line(valid_manifest):
    """What the fuzzer once found: a newline in a key split the error over two lines."""
    root, original = valid_manifest
    doc = {**json.loads(json.dumps(original)), "producer": {"a\nb": None}}
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(BundleError) as e:
        read_manifest(root)
    assert "\n" not in str(e.value) and 'producer."a\\nb": expected a string, got null' in str(e.value)


def test_unlisted_files_and_outward_links_anywhere_in_the_bundle_are_refused(bundle):
    """An ONNX graph names its own external data files: a file the manifest does not list must not be there to read."""
    (bundle / "dit_low_noise" / "extra.data").write_bytes(b"unverified")
    with pytest.raises(BundleError, match="dit_low_noise/extra.data: in the bundle but not listed"):
        verify_bundle(bundle)
    (bundle / "dit_low_noise" / "extra.data").unlink()
    os.symlink(outside_file(bundle), bundle / "dit_low_noise" / "evil")
    with pytest.raises(BundleError, match="evil: a symbolic link to .*secret, outside the bundle"):
        verify_bundle(bundle)
