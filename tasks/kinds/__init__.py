"""The kinds of task kdflow knows, by name: the one place that lists them.

Built-in kinds are packages under tasks/kinds/; another installed package adds one through the
`kdflow.kinds` entry-point group, whose entry names its `TaskKind` subclass (or an instance):

    [project.entry-points."kdflow.kinds"]
    regression = "my_package.kind:Regression"

A name that is already taken (a built-in's, or another package's) is an error naming both, never a silent
replacement. Loading a kind imports only its light module (its spec sections); torch and the rest come
when it is used.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from tasks.errors import UserError
from tasks.kinds.base import TaskKind

GROUP = "kdflow.kinds"
DEFAULT = "classification"  # the kind of a workflow that names no `task`
BUILTIN = {
    "classification": "tasks.kinds.classification:Classification",
    "causal_lm": "tasks.kinds.causal_lm:CausalLM",
    "image_classification": "tasks.kinds.image_classification:ImageClassification",
}


def _load(target: str, where: str) -> TaskKind:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load the kind {target!r}: {exc}", where=where) from None
    kind = obj() if isinstance(obj, type) else obj
    if not isinstance(kind, TaskKind):
        raise UserError(f"{target!r} is a {type(kind).__name__}, not a tasks.kinds.TaskKind", where=where)
    return kind


@cache
def kinds() -> dict[str, TaskKind]:
    """Every kind by name: the built-ins, then those installed packages declare."""
    out = {name: _load(target, "tasks.kinds") for name, target in BUILTIN.items()}
    origin = dict.fromkeys(out, "kdflow")
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        where = f"entry point {ep.name} = {ep.value} ({ep.dist.name if ep.dist else 'unknown package'})"
        if ep.name in out:
            raise UserError(f"a kind named {ep.name!r} is already registered by {origin[ep.name]}; a kind's "
                            "name is taken once", where=where)
        kind = _load(ep.value, where)
        if kind.name != ep.name:
            raise UserError(f"the entry point names the kind {ep.name!r} but its name is {kind.name!r}", where=where)
        out[ep.name] = kind
        origin[ep.name] = where
    return out


def kind_for(name: str) -> TaskKind:
    """The kind called `name`; an unknown one is an error listing the known."""
    known = kinds()
    if name not in known:
        raise UserError(f"unknown task kind {name!r}; known: {', '.join(sorted(known))}", where="task")
    return known[name]


__all__ = ["DEFAULT", "GROUP", "TaskKind", "kind_for", "kinds"]
