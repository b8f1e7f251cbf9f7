"""Architecture rules checked from the source: no import cycles inside `dcablate/`, a torch-free config
package, and no stale references (to the shared design file, or to "session") in the repository's
files. This file never spells the design file's name out, so it needs no exemption; tests/ is outside
the "session" rule's scope."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dcablate"


# ----------------------------------------------------------------------------------------- import graph


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under dcablate/ (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`: never runs, so its imports make no cycle."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(body: list[ast.stmt]):
    """The Import / ImportFrom statements that run when the module is imported: top level, and inside
    top-level if / try / with blocks, but not inside def or class bodies (deliberate lazy imports)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            yield from module_level_imports(node.body)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)
            yield from module_level_imports(node.orelse)
            yield from module_level_imports(node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from module_level_imports(node.body)
        # FunctionDef / AsyncFunctionDef / ClassDef (and loops) are skipped on purpose


def ancestors(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dcablate modules that importing `name` imports directly (module-level statements only)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in module_level_imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: `from . import x`, `from ..a import b`
            base = package.split(".")
            if node.level - 1 > len(base) - 1:
                raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        for alias in node.names:
            candidate = f"{source}.{alias.name}"
            targets.add(candidate if alias.name != "*" and candidate in modules else source)
    found = set()
    for target in targets:
        if target not in modules:
            if target.split(".")[0] == "dcablate":  # a dcablate name that is not a module: its package
                while target and target not in modules:
                    target = target.rpartition(".")[0]
            if not target:
                continue
        if target not in modules:
            continue  # outside dcablate
        # importing a.b.c runs a/__init__ and a/b/__init__ first; the importer's own packages are already
        # initialised (or initialising) before its body runs, so those implicit edges add nothing new
        for parent in ancestors(target):
            if parent in modules and parent not in ancestors(name):
                found.add(parent)
        found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path
    `[a, b, ..., a]`, shortest through the component's smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        # breadth-first search back to `start` inside the component: the shortest cycle through it
        previous = {start: None}
        queue = [start]
        end = None
        while queue and end is None:
            nxt = []
            for v in queue:
                for w in sorted(graph[v] & component):
                    if w == start:
                        end = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            queue = nxt
        path = [start]
        v = end
        while v is not None and v != start:
            path.append(v)
            v = previous[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return sorted(cycles)


def test_graph_finds_a_cycle():
    """The checker itself: a planted two-module cycle is found and written `a -> b -> a`."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a", "p.c"}, "p.c": set()}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set()}) == []


def test_module_level_imports_only(tmp_path):
    """The walk counts top-level, if and try imports, resolves relative ones, and skips def/class bodies."""
    pkg = tmp_path / "dcablate"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "c.py").write_text("")
    (pkg / "d.py").write_text("")
    (pkg / "e.py").write_text("")
    (pkg / "f.py").write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from . import b\n"
        "try:\n    from ..d import thing\nexcept ImportError:\n    pass\n"
        "if True:\n    import dcablate.sub.c\n"
        "def lazy():\n    from dcablate import e\n"
        "class K:\n    from dcablate import f\n")
    modules = {"dcablate": pkg / "__init__.py", "dcablate.sub": pkg / "sub" / "__init__.py",
               "dcablate.sub.a": pkg / "sub" / "a.py", "dcablate.sub.b": pkg / "sub" / "b.py",
               "dcablate.sub.c": pkg / "sub" / "c.py", "dcablate.d": pkg / "d.py", "dcablate.e": pkg / "e.py",
               "dcablate.f": pkg / "f.py"}
    assert imported_modules("dcablate.sub.a", modules["dcablate.sub.a"], modules) == {
        "dcablate.sub.b", "dcablate.sub.c", "dcablate.d"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles inside dcablate/ (module-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------------------- config is torch-free


def test_config_does_not_import_torch():
    """`import dcablate.config` (and every module under dcablate/config/) in a fresh interpreter leaves torch
    unloaded: recipes are read and checked by the CLI before anything heavy is imported."""
    names = [n for n in module_files() if n == "dcablate.config" or n.startswith("dcablate.config.")]
    code = (f"import importlib, sys\n"
            f"for name in {names!r}:\n"
            f"    importlib.import_module(name)\n"
            f"    if 'torch' in sys.modules:\n"
            f"        print(name)\n"
            f"        break\n"
            f"else:\n"
            f"    print('torch-free')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch-free", f"importing {out.stdout.strip()} put torch in sys.modules"


# ----------------------------------------------------------------------------------------- stale references


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / n for n in names.decode().split("\0") if n]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary (NUL byte or not UTF-8) or missing file."""
    try:
        data = path.read_bytes()
    except OSError:  # deleted in the working tree but still in the index
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def hits(pattern: re.Pattern, files) -> list[str]:
    out = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                out.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    return out


def test_no_design_md_references():
    fixtures = ROOT / "tests" / "fixtures"
    files = [p for p in tracked_files() if fixtures not in p.parents]
    found = hits(re.compile("DESIGN\\.md"), files)
    assert not found, "files mentioning DESIGN" ".md:\n" + "\n".join(found)


SESSION = re.compile(r"(?<![A-Za-z0-9_])(?!(?-i:start_new_session)(?![A-Za-z0-9_]))"
                     r"(?!(?-i:new_session)(?![A-Za-z0-9_]))"
                     r"[A-Za-z0-9_]*session", re.IGNORECASE)


def test_session_pattern():
    assert not SESSION.search("subprocess.Popen(cmd, start_new_session=True)")
    assert not SESSION.search("os.setsid  # new_session")
    assert SESSION.search("a Session of the tool")
    assert SESSION.search("this session's output")
    assert SESSION.search("start_new_sessions")
    assert SESSION.search("my_new_session")
    assert SESSION.search("x = start_new_session or session")
    assert SESSION.search("START_NEW_SESSION")  # the exact words only


def test_no_session_mentions():
    scope = [PACKAGE, ROOT / "docs", ROOT / "README.md", ROOT / "CHANGELOG.md"]
    files = [p for p in tracked_files() if any(p == s or s in p.parents for s in scope)]
    found = hits(SESSION, files)
    assert not found, "files mentioning 'session' (other than start_new_session / new_session):\n" + "\n".join(found)
