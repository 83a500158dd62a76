"""The shape of the code, checked: layers point one way, no module imports another in a circle, the driver
asks a kind and names none, nothing reaches Ray's private modules but the one wrapper, no function runs
past 60 lines. Read from the source (imports inside functions included), no Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tasks.kinds import BUILTIN, kinds

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "orchestrator").rglob("*.py"), *(REPO / "tasks").rglob("*.py")])
MAX_FUNCTION_LINES = 60
RAY_PRIVATE = ("ray._private", "ray.train.v2._internal")
RAY_WRAPPER = "tasks.ray_internals"


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, lazy imports inside functions included, TYPE_CHECKING blocks not (they are
    never run); `from a import b` counts a.b too when b is a module."""
    names: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def graph() -> dict[str, set[str]]:
    mods = {module_of(p): p for p in SOURCES}
    return {m: {n for n in imports(p) if n in mods and n != m and not m.startswith(n + ".")}
            for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle() -> None:
    edges = graph()
    assert len(edges) > 60 and sum(map(len, edges.values())) > 150  # the graph was read, not empty
    assert not cycles(edges)


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tasks_never_imports_orchestrator() -> None:
    offenders = {module_of(p): sorted(n for n in imports(p) if n.split(".")[0] == "orchestrator")
                 for p in SOURCES if module_of(p).startswith("tasks")}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_tasks_module_loads_no_orchestrator_module() -> None:
    """Indirect imports too: a fresh interpreter imports all of tasks/ and must not have loaded orchestrator."""
    modules = [module_of(p) for p in SOURCES if module_of(p).startswith("tasks")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'orchestrator'))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_driver_names_no_kind_of_task() -> None:
    """orchestrator/ asks the workflow's kind; no string in it is a kind's name, no module is named after one.
    The kinds are listed once, in tasks/kinds/__init__.py."""
    names = set(kinds()) | set(BUILTIN)
    assert {"classification", "causal_lm"} <= names
    named = sorted(f"{p.relative_to(REPO)}:{n.lineno} {n.value!r}" for p in SOURCES
                   if module_of(p).startswith("orchestrator")
                   for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant) and n.value in names)
    assert not named
    assert not [p for p in SOURCES if module_of(p).startswith("orchestrator") and
                any(word in p.stem for word in ("lm", "classif", "image", "kind"))]


def test_every_kind_is_a_package_under_tasks_kinds() -> None:
    for name, target in BUILTIN.items():
        package = REPO / Path(*target.partition(":")[0].split("."))
        assert (package / "__init__.py").is_file() and package.parent == REPO / "tasks" / "kinds", name
        assert kinds()[name].name == name


def test_only_the_wrapper_reaches_rays_private_modules() -> None:
    offenders = {module_of(p): sorted(n for n in imports(p) if n.startswith(RAY_PRIVATE))
                 for p in SOURCES if module_of(p) != RAY_WRAPPER}
    assert not {k: v for k, v in offenders.items() if v}
    assert any(n.startswith(RAY_PRIVATE) for n in imports(REPO / "tasks" / "ray_internals.py"))


def test_no_function_runs_past_60_lines() -> None:
    long = sorted(f"{p.relative_to(REPO)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in SOURCES
                  for n in ast.walk(ast.parse(p.read_text()))
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES)
    assert not long
