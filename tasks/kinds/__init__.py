"""Task kinds by name: the interface is `TaskKind` (tasks/kinds/base.py), classification its one implementation."""

from __future__ import annotations

from tasks.errors import UserError
from tasks.kinds.base import Share, TaskKind
from tasks.kinds.classification import Classification

KINDS: dict[str, TaskKind] = {"classification": Classification()}


def task_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise UserError(f"unknown task kind {name!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[name]


__all__ = ["KINDS", "Share", "TaskKind", "task_kind"]
