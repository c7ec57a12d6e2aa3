"""Untrusted JSON in, typed dataclasses out: one precise error for every malformed value.

Bundles travel between machines and LightX2V configs come from anywhere, so every JSON file
wanrt reads goes through `load_json` (bounded size, nesting and number length; no NaN or
Infinity; duplicate keys refused) and every object becomes a dataclass through
`from_json(cls, value, where)`, which checks each field against the dataclass's own type
hints (`int` is never a bool or a float, `float` is finite, `tuple[int, int]` has two items,
`X | None`, `list[T]`, `dict[str, T]`, nested dataclasses).  Errors name the path of the value
(`manifest.json: components.dit.files[2]: expected a string, got 3`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import WanrtError


@dataclass(frozen=True)
class JsonLimits:
    """Bounds checked before (size) and while (nesting, number length) a JSON text is parsed."""

    max_bytes: int = 16 << 20
    max_depth: int = 64
    max_number_chars: int = 40  # longer literals are refused before int()/float() see them


DEFAULT_LIMITS = JsonLimits()


def short(value: Any, limit: int = 60) -> str:
    """repr(value), abbreviated to about `limit` characters (long values in messages stay readable)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}...{text[-10:]} ({len(text)} chars)"


def _depth_within(value: Any, limit: int) -> bool:
    """Whether nested lists/objects go at most `limit` levels deep (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return True


def load_json(
    data: bytes | str, where: str, error: type[WanrtError] = WanrtError, limits: JsonLimits = DEFAULT_LIMITS
) -> Any:
    """Parse untrusted JSON; `error(f"{where}: ...")` for anything malformed, oversized, too deep or non-finite."""
    size = len(data)
    if size > limits.max_bytes:
        raise error(f"{where}: {size} bytes of JSON, more than the {limits.max_bytes} this reader accepts")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text (byte {e.start})") from None

    def number(kind: type):
        def parse(literal: str):
            if len(literal) > limits.max_number_chars:
                raise error(f"{where}: number literal {short(literal)} is longer than {limits.max_number_chars} characters")
            value = kind(literal)
            if kind is float and not math.isfinite(value):
                raise error(f"{where}: number {short(literal)} is out of range")
            return value

        return parse

    def constant(name: str):
        raise error(f"{where}: {name} is not a JSON number (expected a finite value)")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {short(key)} appears twice in one object")
            out[key] = value
        return out

    try:
        value = json.loads(
            data, parse_int=number(int), parse_float=number(float), parse_constant=constant,
            object_pairs_hook=no_duplicates,
        )
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {limits.max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not _depth_within(value, limits.max_depth):
        raise error(f"{where}: JSON nested deeper than {limits.max_depth} levels")
    return value


def describe(value: Any) -> str:
    """How a JSON value is named in an error: its kind and an abbreviated repr."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    if value is None:
        return "null"
    return f"{kinds.get(type(value), type(value).__name__)} {short(value)}"


class _Mismatch(Exception):
    """A value that does not fit a type; carries the path below the current value and the expectation."""

    def __init__(self, path: str, expected: str, value: Any):
        super().__init__(path, expected, value)
        self.path, self.expected, self.value = path, expected, value


def _expected_name(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items"
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp) or tp is dict:
        return "an object"
    return str(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp`, or _Mismatch naming the first offending sub-value."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(path, _expected_name(tp), value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(path, _expected_name(tp), value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch(path, _expected_name(tp), value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(path, _expected_name(tp), value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch(path, "null", value)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except _Mismatch as e:
                if e.path != path:  # the value has the right shape but something inside it is wrong
                    raise
        raise _Mismatch(path, _expected_name(tp), value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch(path, _expected_name(tp), value)
        if origin is list:
            return [_convert(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch(path, _expected_name(tp), value)
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(path, "an object", value)
        key_type, value_type = args if args else (str, Any)
        return {_convert(k, key_type, f"{path}.{_shown(k)}"): _convert(v, value_type, f"{path}.{_shown(k)}")
                for k, v in value.items()}  # fmt: skip
    raise TypeError(f"from_json does not handle the type {tp!r} (at {path})")


def _shown(key: str) -> str:
    """A key as an error path shows it: as it is, or JSON-quoted when it holds a control character (the error
    stays one line)."""
    return key if key.isprintable() else json.dumps(key)


def _dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _Mismatch(path, "an object", value)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Mismatch(sub, _expected_name(hints[f.name]), _MISSING)
            continue
        kwargs[f.name] = _convert(value[f.name], hints[f.name], sub)
    return cls(**kwargs)


_MISSING = object()


def from_json(cls: type, value: Any, where: str, error: type[WanrtError] = WanrtError, path: str = "") -> Any:
    """Build dataclass `cls` from a parsed JSON object, checking every field's type; `error` names the bad value."""
    try:
        return _convert(value, cls, path)
    except _Mismatch as e:
        if e.value is _MISSING:
            raise error(f"{where}: {e.path}: missing (expected {e.expected})") from None
        raise error(f"{where}: {e.path or 'the top level'}: expected {e.expected}, got {describe(e.value)}") from None


def to_json(value: Any) -> Any:
    """A dataclass (or nested lists, tuples and dicts of them) as plain JSON values: the inverse of `from_json`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
