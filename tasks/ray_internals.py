"""The one place kdflow touches Ray's private modules, each use with why no public API serves.

Ray 2.60 keeps these behind `ray._private` and `ray.train.v2._internal`; a Ray upgrade that moves them
breaks only this module, and every function here degrades to doing nothing (or less) when it cannot find
what it reaches for: none of them is needed for a run to be correct, only quieter or faster.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any


def quiet_train_reports() -> None:
    """Ray Train 2.60 logs every `ray.train.report` at INFO (all metrics, one long line) on a logger named
    after its own file, which `LoggingConfig(log_level)` does not reach: keep it to warnings. No public API
    names that logger."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_output_dispatcher() -> Any:
    """The dispatcher through which a driver prints its workers' stdout/stderr (`log_to_driver`), or None.
    Ray has no public hook to filter that stream; kdflow wraps its print handler (orchestrator/quiet.py)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def import_start_modules() -> None:
    """Import what `ray.init` imports of Ray's node machinery, so that a thread starting Ray and the main
    thread importing torch never wait on each other's half-imported modules (orchestrator/runtime.py)."""
    import ray._private.node
    import ray._private.services  # noqa: F401


def stop_local_monitor() -> None:
    """Kill a local head node's autoscaler monitor before `ray.shutdown`: Ray stops a node's processes one
    after another with a second's SIGTERM grace each, and the monitor (of no use to a one-node local Ray,
    holding no state) used the whole second every time. Ray exposes the node's processes only through its
    private global node."""
    with contextlib.suppress(Exception):
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is not None and node.head:
            for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
                info.process.kill()
                info.process.wait(timeout=5)
