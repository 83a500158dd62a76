"""Silence what a successful run prints that is not about the user's workflow, and nothing else.

Each entry names one known line of a library (Ray's, MLflow's) that reads like an error or a warning
although nothing is wrong; everything else a worker or library prints still reaches stderr.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

# Lines Ray workers print that never concern the user (matched per line, on the worker's text).
RAY_WORKER_NOISE = (
    # Ray Train's controller starts this actor with arguments in the object store; the C++ core worker
    # logs it at ERROR level (ray-project/ray#53727) on every run.
    re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
)


def _filtered(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def emit(data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", []) if not any(p.search(line) for p in RAY_WORKER_NOISE)]
        if lines or not data.get("lines"):
            handle({**data, "lines": lines})

    emit.kdflow_filtered = True  # type: ignore[attr-defined]
    return emit


def filter_ray_worker_logs() -> None:
    """Drop RAY_WORKER_NOISE from the worker output Ray copies to the driver (log_to_driver)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this dispatcher: print everything, as before
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, h if name != "ray_print_logs" or getattr(h, "kdflow_filtered", False)
                                else _filtered(h)) for name, h in dispatcher.handlers]


def quiet_ray_start() -> None:
    """Ray's notice that a local cluster uses token auth (the default, and what kdflow wants) is not a warning."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
