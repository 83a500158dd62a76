"""Opt-in timing of a search's parts: with KDFLOW_TRACE=FILE set, each `span` appends one JSON line to FILE.

For measuring where a trial's time goes (benchmarks/RESULTS-search.md) across the driver, the warm trial
actors and the pruning monitor, which all see the variable (Ray's local workers inherit the driver's
environment). Unset, a span costs one environment lookup and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def span(name: str, **tags: Any) -> Iterator[None]:
    path = os.environ.get("KDFLOW_TRACE")
    if not path:
        yield
        return
    start, t0 = time.time(), time.perf_counter()
    try:
        yield
    finally:
        line = {"name": name, "start": start, "s": time.perf_counter() - t0, "pid": os.getpid(),
                "thread": threading.current_thread().name, **tags}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
