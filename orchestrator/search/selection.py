"""search.select: the rule that picks one trial (one student) from a search's results.

Rules (docs/search.md):

- `best`: one objective: the trial with the best value. Several objectives: the trial on the Pareto
  front with the best value of the first objective (ties broken by the next objectives, then by the
  earlier trial).
- `smallest within D of best [METRIC] [by SIZE]`: among the candidates (the Pareto front with several
  objectives, every completed trial with one) whose METRIC is within D of the best METRIC (D in the
  metric's own units: 0.01 is one point of accuracy), the one with the smallest SIZE. METRIC defaults
  to the first objective and must be an objective; SIZE defaults to num_params (always known) or is
  another objective's metric. Ties go to the better METRIC, then to the earlier trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.spec import SelectRule

EPS = 1e-12  # 0.95 - 0.94 > 0.01 in floating point; "within" must not hinge on that

Objectives = Sequence[tuple[str, str]]  # (metric, "maximize" | "minimize"), in the spec's order


@dataclass(frozen=True)
class Candidate:
    """A completed trial as selection sees it: its number and its metric values (objectives + num_params)."""

    number: int
    metrics: dict[str, float]


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def _dominates(a: Candidate, b: Candidate, objectives: Objectives) -> bool:
    no_worse = all(not _better(b.metrics[m], a.metrics[m], d) for m, d in objectives)
    return no_worse and any(_better(a.metrics[m], b.metrics[m], d) for m, d in objectives)


def pareto_front(candidates: Sequence[Candidate], objectives: Objectives) -> list[Candidate]:
    """The candidates no other candidate dominates, in trial order."""
    front = [c for c in candidates if not any(_dominates(o, c, objectives) for o in candidates if o is not c)]
    return sorted(front, key=lambda c: c.number)


def _rank_key(objectives: Objectives) -> Callable[[Candidate], tuple[float, ...]]:
    """Sort key: better first objective first, then the next objectives, then the earlier trial."""

    def key(c: Candidate) -> tuple[float, ...]:
        signed = [-c.metrics[m] if d == "maximize" else c.metrics[m] for m, d in objectives]
        return (*signed, c.number)

    return key


def select_trial(candidates: Sequence[Candidate], objectives: Objectives, rule: str | SelectRule) -> Candidate:
    """The one candidate the rule picks; the pool is the Pareto front when there are several objectives."""
    if not candidates:
        raise ValueError("no completed trial to select from")
    parsed = SelectRule.parse(rule) if isinstance(rule, str) else rule
    pool = pareto_front(candidates, objectives) if len(objectives) > 1 else list(candidates)
    if parsed.kind == "best":
        return min(pool, key=_rank_key(objectives))
    metric = parsed.metric or objectives[0][0]
    direction = dict(objectives).get(metric, "maximize")
    values = [c.metrics[metric] for c in pool]
    best = max(values) if direction == "maximize" else min(values)
    close = [c for c in pool if abs(c.metrics[metric] - best) <= parsed.tolerance + EPS]
    sign = -1.0 if direction == "maximize" else 1.0
    return min(close, key=lambda c: (c.metrics[parsed.size], sign * c.metrics[metric], c.number))
