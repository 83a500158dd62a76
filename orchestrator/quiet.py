"""Silence what a successful run prints that is not about the user's workflow, and nothing else.

Each entry names one known line of a library (Ray's, MLflow's) that reads like an error or a warning
although nothing is wrong; everything else a worker or library prints still reaches stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

# Lines Ray workers print that never concern the user (matched per line, on the worker's text).
RAY_WORKER_NOISE = (
    # Ray Train's controller starts this actor with arguments in the object store; the C++ core worker
    # logs it at ERROR level (ray-project/ray#53727) on every run.
    re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
)
# Lines that open a logged traceback that never concerns the user: the line and the traceback under it go.
RAY_WORKER_NOISE_WITH_TRACEBACK = (
    # Ray Train's controller asks the autoscaling coordinator for resources with a short timeout; on a busy
    # machine the ask times out and it logs the exception, though the run goes on and (as its own message
    # says) a transient timeout is safe to ignore. A local cluster has no autoscaler to ask at all.
    re.compile(r"Failed to send resource request for train-"),
)
_TRACEBACK_BODY = re.compile(r"^(Traceback \(most recent call last\):|\s)")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Timeout)\b")


def drop_noise(lines: list[str], skipping: bool) -> tuple[list[str], bool]:
    """`lines` without the noise lines and the tracebacks that follow those that open one. `skipping` says
    whether the previous batch of this process ended inside such a traceback; returns the same for this one."""
    out = []
    for line in lines:
        if skipping:
            if _TRACEBACK_BODY.match(line):
                continue
            skipping = False
            if _EXCEPTION_LINE.match(line):  # the traceback's last line: the exception itself
                continue
        if any(p.search(line) for p in RAY_WORKER_NOISE_WITH_TRACEBACK):
            skipping = True
            continue
        if not any(p.search(line) for p in RAY_WORKER_NOISE):
            out.append(line)
    return out, skipping


# Ray colours the "[repeated 3x across cluster]" it appends to a deduplicated worker line whatever stderr is;
# RAY_COLOR_PREFIX=0 (`quiet_ray_start`) covers only the "(pid=...)" prefix.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _filtered(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    inside: dict[Any, bool] = {}  # per worker process: its last batch ended inside a dropped traceback
    plain = not sys.stderr.isatty()  # no colour codes into a file or a pipe

    def emit(data: dict[str, Any]) -> None:
        lines, inside[data.get("pid")] = drop_noise(data.get("lines", []), inside.get(data.get("pid"), False))
        if plain:
            lines = [_ANSI.sub("", line) for line in lines]
        if lines or not data.get("lines"):
            handle({**data, "lines": lines})

    emit.kdflow_filtered = True  # type: ignore[attr-defined]
    return emit


def filter_ray_worker_logs() -> None:
    """Drop RAY_WORKER_NOISE from the worker output Ray copies to the driver (log_to_driver)."""
    from tasks.ray_internals import worker_output_dispatcher

    dispatcher = worker_output_dispatcher()
    if dispatcher is None:  # a Ray without this dispatcher: print everything, as before
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, h if name != "ray_print_logs" or getattr(h, "kdflow_filtered", False)
                                else _filtered(h)) for name, h in dispatcher.handlers]


def _not_sigterm_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SIGTERM handler is not set")


def quiet_ray_start() -> None:
    """Ray's notice that a local cluster uses token auth (the default, and what kdflow wants) is not a warning;
    nor is its notice that `ray.init` on a thread did not set the SIGTERM handler (`runtime.in_background`
    sets it on the main thread). And no colour codes where stderr is a file or a pipe (a CI log,
    `2> run.log`: "[36m" garbage): Ray colours each worker line's "(TrialWorker pid=...)" prefix unless
    RAY_COLOR_PREFIX=0 (a value the user set is kept); `_filtered` strips the rest."""
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    worker = logging.getLogger("ray._private.worker")
    if _not_sigterm_notice not in worker.filters:
        worker.addFilter(_not_sigterm_notice)


def quiet_mlflow_info() -> None:
    """MLflow's INFO lines while it creates its local database or logs a model ("Creating initial MLflow
    database tables", "Validating input example against model signature") are not about the workflow;
    warnings and errors still show."""
    for name in ("mlflow.pyfunc", "mlflow.models", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def no_mlflow_eprint() -> Iterator[None]:
    """Silence the lines MLflow prints (not logs) around one registry call ("Successfully registered model",
    "Created version"): the register stage prints its own line with the version and the alias. Its errors
    still arrive, as exceptions."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    was = stream.enabled
    stream.enabled = False
    try:
        yield
    finally:
        stream.enabled = was
