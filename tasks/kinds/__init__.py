"""Task kinds by name: the interface is `TaskKind` (tasks/kinds/base.py), classification and causal_lm (tasks/kinds/lm.py) implement it."""

from __future__ import annotations

from tasks.errors import UserError
from tasks.kinds.base import Share, TaskKind
from tasks.kinds.classification import Classification
from tasks.kinds.lm import CausalLMKind

KINDS: dict[str, TaskKind] = {"classification": Classification(), "causal_lm": CausalLMKind()}


def task_kind(name: str) -> TaskKind:
    if name not in KINDS:
        raise UserError(f"unknown task kind {name!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[name]


__all__ = ["KINDS", "Share", "TaskKind", "task_kind"]
