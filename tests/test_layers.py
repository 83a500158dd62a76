"""The layers point one way: tasks/ (numeric work, run on Ray workers) never imports orchestrator/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = sorted((REPO / "tasks").rglob("*.py"))


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_tasks_module_names_orchestrator() -> None:
    """Every import statement, lazy ones inside functions included."""
    assert len(TASKS) >= 10
    offenders = {p.relative_to(REPO).as_posix(): sorted(n for n in _imported(p) if n.split(".")[0] == "orchestrator")
                 for p in TASKS}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_tasks_module_loads_no_orchestrator_module() -> None:
    """Indirect imports too: a fresh interpreter imports all of tasks/ and must not have loaded orchestrator."""
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in TASKS]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'orchestrator'))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
