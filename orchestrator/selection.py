"""search.select: the rule that picks one trial (one student) from a search's results."""

from __future__ import annotations

import re
from dataclasses import dataclass


WITHIN = re.compile(r"^smallest\s+within\s+([0-9.]+)\s+of\s+best(?:\s+(\w+))?(?:\s+by\s+(\w+))?$")


@dataclass(frozen=True)
class SelectRule:
    """'best': the best value of the first objective; 'smallest within D of best [METRIC] [by SIZE]':
    among trials within D of the best METRIC (default: first objective), the one with the smallest SIZE
    (default num_params)."""

    kind: str
    tolerance: float = 0.0
    metric: str | None = None
    size: str = "num_params"


def parse_select_rule(text: str) -> SelectRule:
    t = text.strip().lower()
    if t == "best":
        return SelectRule("best")
    m = WITHIN.match(t)
    if not m:
        raise ValueError(f"unknown select rule {text!r}: use 'best' or 'smallest within 0.01 of best "
                         "[metric] [by num_params]'")
    return SelectRule("smallest_within", float(m.group(1)), m.group(2), m.group(3) or "num_params")



