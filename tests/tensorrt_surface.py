"""Check the TensorRT names our source uses against the real bindings' API surface, without TensorRT.

The surface (`tests/data/tensorrt*-api-surface.json`) lists every class, enum member, method
(with its pybind11 signatures), property (with a writable flag) and module function of the
real `tensorrt` / `tensorrt_lean` 11.4 bindings. `check_source` parses one of our files with
`ast` and checks:

- `trt.NAME`: a class, function or constant of the module; `trt.Enum.MEMBER`: an enum member;
- `x.attr` where `x` has a known TensorRT type: a method or property of that class (or a base);
- calls: the number of positional arguments and the keyword names fit one of the signatures;
- `x.prop = value`: the property is writable;
- `trtp.NAME` (`tensorrt.plugin`): a public name of the plugin module.

Types come from the code itself: a parameter or variable annotated `trt.X` (string or not), a
constructor call `trt.X(...)`, the return type a signature declares for a method whose owner
is typed, `self.name` assigned from a typed value in any method of the class, and dataclass
fields annotated `trt.X`. Our convention: the TensorRT module is always bound to the name
`trt` (`import tensorrt as trt`, `import tensorrt_lean as trt`, or `trt = import_tensorrt()`),
and `tensorrt.plugin` to `trtp`. Accesses on values of unknown type are not checked; each
`Finding` of kind "checked" records what was, so a test can see its coverage.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
SURFACES = {
    "tensorrt": DATA / "tensorrt-11.4.0.106-api-surface.json",
    "tensorrt_lean": DATA / "tensorrt_lean-11.4.0.106-api-surface.json",
}
_RETURN = re.compile(r"->\s*(?:tensorrt_bindings\.)?(?:tensorrt(?:_lean)?\.)?([A-Za-z_][\w.]*)\s*$")


@dataclass(frozen=True)
class Param:
    name: str
    has_default: bool
    kind: str = "plain"  # "plain", "args" (*args), "kwargs" (**kwargs)


@dataclass(frozen=True)
class Signature:
    params: tuple[Param, ...]  # without self
    returns: str | None  # class name in the surface, when the signature names one

    def accepts(self, n_positional: int, keywords: list[str], star: bool) -> bool:
        """Whether a call with this many positional arguments and these keyword names fits."""
        plain = [p for p in self.params if p.kind == "plain"]
        if any(p.kind == "args" for p in self.params):
            pos_ok = True
        else:
            pos_ok = n_positional <= len(plain)
        names = {p.name for p in plain}
        kw_ok = any(p.kind == "kwargs" for p in self.params) or all(k in names for k in keywords)
        filled = {p.name for p in plain[:n_positional]} | set(keywords)
        required_ok = star or all(p.has_default or p.name in filled for p in plain)
        return pos_ok and kw_ok and required_ok


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def parse_signature(text: str) -> Signature:
    """A pybind11 signature string ("1. name(self: T, a: int = 0) -> R") as parameters and a return class."""
    text = re.sub(r"^\d+\.\s*", "", text.strip())
    open_at = text.index("(")
    depth, close_at = 0, None
    for i in range(open_at, len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            close_at = i
            break
    params = []
    for raw in _split_top_level(text[open_at + 1 : close_at]):
        name = raw.split(":")[0].split("=")[0].strip()
        if name in ("self", "this", ""):
            continue
        kind = "args" if name.startswith("**") is False and name.startswith("*") else "plain"
        kind = "kwargs" if name.startswith("**") else kind
        params.append(Param(name.lstrip("*"), "=" in raw, kind))
    m = _RETURN.search(text[close_at + 1 :])
    return Signature(tuple(params), m.group(1).split(".")[-1] if m else None)


@dataclass
class Surface:
    """One module's API surface, loaded from its JSON."""

    module: str
    classes: dict[str, dict]
    functions: dict[str, list[str]]
    constants: dict[str, str]
    plugin: dict[str, dict]

    @classmethod
    def load(cls, module: str = "tensorrt") -> "Surface":
        d = json.loads(SURFACES[module].read_text())
        return cls(d["module"], d["classes"], d["functions"], d["constants"], d.get("plugin") or {})

    def attribute(self, cls_name: str, attr: str) -> dict | None:
        """The surface entry of `cls_name.attr`, looked up through the bases."""
        seen, todo = set(), [cls_name]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.classes:
                continue
            seen.add(name)
            entry = self.classes[name]
            if attr in entry.get("attributes", {}):
                return entry["attributes"][attr]
            todo.extend(b.split(".")[-1] for b in entry.get("bases", []))
        return None


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str  # "error" or "checked"
    text: str


@dataclass
class _Scope:
    types: dict[str, str] = field(default_factory=dict)  # local name -> TensorRT class


def _annotation_class(node: ast.expr | None) -> str | None:
    """`trt.X` / "trt.X" / `X | None` annotations -> "X"."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _annotation_class(node.left) or _annotation_class(node.right)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
        return node.attr
    return None


class _Checker(ast.NodeVisitor):
    def __init__(self, surface: Surface, path: str, allow: frozenset[str]):
        self.s, self.path, self.allow = surface, path, allow
        self.findings: list[Finding] = []
        self.scopes = [_Scope()]
        self.self_types: dict[str, str] = {}  # attribute of `self` -> class, for the class being visited

    # ---- reporting
    def error(self, node: ast.AST, text: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, "error", text))

    def checked(self, node: ast.AST, text: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, "checked", text))

    # ---- types
    def type_of(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            for scope in reversed(self.scopes):
                if node.id in scope.types:
                    return scope.types[node.id]
            return None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return self.self_types.get(node.attr)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "trt":
                if func.attr in self.s.classes and self.s.classes[func.attr]["kind"] == "class":
                    return func.attr
                return None
            if isinstance(func, ast.Attribute):
                owner = self.type_of(func.value)
                entry = self.s.attribute(owner, func.attr) if owner else None
                if entry and entry.get("type") == "method":
                    returns = {parse_signature(t).returns for t in entry.get("signatures", [])}
                    returns.discard(None)
                    if len(returns) == 1:
                        name = returns.pop()
                        return name if name in self.s.classes else None
        return None

    def bind(self, target: ast.expr, cls_name: str | None) -> None:
        if cls_name is None:
            return
        if isinstance(target, ast.Name):
            self.scopes[-1].types[target.id] = cls_name
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self.self_types[target.attr] = cls_name

    # ---- visitors
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = self.self_types
        self.self_types = {}
        for stmt in node.body:  # dataclass-style fields annotated trt.X
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                cls_name = _annotation_class(stmt.annotation)
                if cls_name:
                    self.self_types[stmt.target.id] = cls_name
        for stmt in ast.walk(node):  # self.x = <typed> anywhere in the class, before the bodies are checked
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        ann = _annotation_class(stmt.annotation) if isinstance(stmt, ast.AnnAssign) else None
                        typed = ann or (self.type_of(stmt.value) if stmt.value is not None else None)
                        if typed:
                            self.self_types[t.attr] = typed
        for base in node.bases:
            self.visit(base)
        for stmt in node.body:
            self.visit(stmt)
        self.self_types = saved

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        scope = _Scope()
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            cls_name = _annotation_class(arg.annotation)
            if cls_name:
                scope.types[arg.arg] = cls_name
        self.scopes.append(scope)
        for stmt in node.body:
            self.visit(stmt)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self.check_store(t)
            self.bind(t, self.type_of(node.value))

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.check_store(node.target)
        self.bind(node.target, _annotation_class(node.annotation) or (self.type_of(node.value) if node.value else None))

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.bind(item.optional_vars, self.type_of(item.context_expr))
        for stmt in node.body:
            self.visit(stmt)

    def check_store(self, target: ast.expr) -> None:
        if not isinstance(target, ast.Attribute):
            if isinstance(target, (ast.Tuple, ast.List)):
                for elt in target.elts:
                    self.check_store(elt)
            return
        self.visit(target.value)
        owner = self.type_of(target.value)
        if owner is None:
            return
        entry = self.s.attribute(owner, target.attr)
        where = f"{owner}.{target.attr}"
        if entry is None:
            self.error(target, f"{where} is assigned but is not an attribute of {self.s.module}.{owner}")
        elif entry.get("type") != "property" or not entry.get("writable"):
            self.error(target, f"{where} is assigned but is not a writable property")
        else:
            self.checked(target, f"{where} = ...")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        n_pos = sum(1 for a in node.args if not isinstance(a, ast.Starred))
        star = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        sigs, where = None, None
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "trtp":
                entry = self.s.plugin.get(func.attr, {})
                if entry.get("type") == "function":
                    sigs, where = [func.attr + entry["signature"]], f"trtp.{func.attr}(...)"
            elif isinstance(func.value, ast.Name) and func.value.id == "trt":
                cls = self.s.classes.get(func.attr)
                if cls is not None and cls["kind"] == "class":
                    init = cls.get("attributes", {}).get("__init__")
                    sigs, where = (init or {}).get("signatures", []), f"trt.{func.attr}(...)"
                elif func.attr in self.s.functions:
                    sigs, where = [s for s in self.s.functions[func.attr] if "(" in s and not s.startswith("(")], f"trt.{func.attr}(...)"
            else:
                owner = self.type_of(func.value)
                entry = self.s.attribute(owner, func.attr) if owner else None
                if entry is not None and entry.get("type") == "method":
                    sigs, where = entry.get("signatures", []), f"{owner}.{func.attr}(...)"
        if sigs:
            parsed = [parse_signature(t) for t in sigs]
            if any(p.accepts(n_pos, keywords, star) for p in parsed):
                self.checked(node, f"{where} with {n_pos} positional and keywords {keywords}")
            else:
                self.error(node, f"{where}: no signature takes {n_pos} positional argument(s) and keywords {keywords}: {sigs}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        value = node.value
        if isinstance(value, ast.Name) and value.id == "trt":
            name = node.attr
            if name in self.allow:
                self.checked(node, f"trt.{name} (allowed outside the 11.4 surface)")
            elif name in self.s.classes or name in self.s.functions or name in self.s.constants or name in ("plugin", "__version__"):
                self.checked(node, f"trt.{name}")
            else:
                self.error(node, f"trt.{name} is not in {self.s.module} {SURFACE_VERSION}")
            return
        if isinstance(value, ast.Name) and value.id == "trtp":
            if node.attr in self.s.plugin:
                self.checked(node, f"trtp.{node.attr}")
            else:
                self.error(node, f"trtp.{node.attr} is not in tensorrt.plugin {SURFACE_VERSION}")
            return
        if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "trt":
            cls = self.s.classes.get(value.attr)
            dotted = f"trt.{value.attr}.{node.attr}"
            if f"{value.attr}.{node.attr}" in self.allow:
                self.checked(node, f"{dotted} (allowed outside the 11.4 surface)")
            elif cls is not None and cls["kind"] == "enum":
                if node.attr in cls.get("members", []) or node.attr in cls.get("attributes", {}):
                    self.checked(node, dotted)
                else:
                    self.error(node, f"{dotted}: {value.attr} has no member {node.attr} in {self.s.module} {SURFACE_VERSION}")
            elif cls is not None and self.s.attribute(value.attr, node.attr) is None:
                self.error(node, f"{dotted} is not an attribute of {self.s.module}.{value.attr}")
            self.visit(value)
            return
        owner = self.type_of(value)
        if owner is not None:
            if self.s.attribute(owner, node.attr) is None:
                self.error(node, f"{owner}.{node.attr} is not an attribute of {self.s.module}.{owner}")
            else:
                self.checked(node, f"{owner}.{node.attr}")
        self.generic_visit(node)


SURFACE_VERSION = "11.4.0.106"


def check_source(path: str | Path, surface: Surface, allow: frozenset[str] = frozenset(), source: str | None = None) -> list[Finding]:
    """Every TensorRT use found in one file: errors, and what was checked."""
    text = Path(path).read_text() if source is None else source
    checker = _Checker(surface, str(path), allow)
    checker.visit(ast.parse(text, str(path)))
    return checker.findings
