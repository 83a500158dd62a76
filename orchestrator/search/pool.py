"""Warm trial slots: each of a search's `concurrency` slots keeps its actors for trial after trial.

A slot holds a `TrialMonitor` (the pruner's epoch hook, on the driver's node) and, for single-worker
CPU trials, a `TrialWorker`: a long-lived Ray actor with torch imported that runs the one train loop
(`tasks.warm.fit_here`) once per call and keeps the decoded soft-target rows of each cache key between
calls. A trial is then one actor call, and its cost is its epochs (docs/architecture.md has the
measurements). A pruned trial returns from its call at the epoch it was pruned, so its slot takes the
next trial at once. An actor that dies mid-trial (its process killed, the node lost) is replaced by a
fresh one and the trial retried, up to `train.max_failures` times, from its newest checkpoint; after
that the trial fails with the error recorded. Trials with `train.workers > 1` (or GPUs) still run as Ray
Train runs, whose start-up is small beside data-parallel work; they use the slot's monitor only.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator import progress
from tasks.fit_config import FitConfig
from tasks.storage import Storage
from tasks.train import FitResult


class TrialWorker:
    """One warm trial process. `fit` is a whole single-worker fit; rows stay cached by cache key."""

    def __init__(self) -> None:
        import torch  # noqa: F401 - imported once here, not at the first trial

        import tasks.warm  # noqa: F401

        self.cache: dict[Any, Any] = {}
        self.fits = 0

    def fit(self, cfg: FitConfig, storage: Storage, run_name: str) -> FitResult:
        from tasks.warm import fit_here, with_cache

        self.fits += 1
        return fit_here(with_cache(cfg, self.cache), storage=storage, run_name=run_name)

    def info(self) -> dict[str, Any]:
        """The process, how many fits it ran, and the cache keys whose rows it holds (what tests look at)."""
        return {"pid": os.getpid(), "fits": self.fits, "cache_keys": sorted({k[1] for k in self.cache})}


def warm_fits(cfg: FitConfig) -> bool:
    """Whether a trial runs on a warm actor: one worker on CPUs (else a Ray Train run).

    KDFLOW_WARM_TRIALS=0 sends every trial through Ray Train (the path before warm slots; benchmarks
    compare the two in one run)."""
    if os.environ.get("KDFLOW_WARM_TRIALS", "1") == "0":
        return False
    return cfg.resources.workers == 1 and not cfg.resources.use_gpu


def start_worker(cpus: float) -> Any:
    import ray

    return ray.remote(num_cpus=cpus, max_restarts=0, max_concurrency=1)(TrialWorker).remote()


class Slot:
    """One of a search's `concurrency` trial slots: its actors are started on first use and kept."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.monitor: Any = None
        self.worker: Any = None
        self.worker_cpus: float | None = None
        self.replaced = 0  # workers replaced after they died

    def watch(self, url: str, study: str, trial_id: int, pruner: Any, metric: str | None, last_epoch: int) -> Any:
        """The slot's monitor, begun for this trial (started on first use, or again if it died)."""
        import ray

        from orchestrator.search.study import start_monitor

        if self.monitor is not None:
            try:
                ray.get(self.monitor.begin.remote(url, study, trial_id, pruner, metric, last_epoch))
                return self.monitor
            except ray.exceptions.RayActorError:
                self.monitor = None
        self.monitor = start_monitor(url, study, trial_id, pruner, metric, last_epoch)
        return self.monitor

    def fit(self, cfg: FitConfig, storage: Storage, run_name: str, on_retry: Any = None) -> tuple[FitResult, int]:
        """One trial's fit on the slot's warm worker; returns the result and how many times it was retried."""
        import ray

        retries = 0
        while True:
            if self.worker is None or self.worker_cpus != cfg.resources.cpus_per_worker:
                self.close_worker()
                self.worker, self.worker_cpus = start_worker(cfg.resources.cpus_per_worker), \
                    cfg.resources.cpus_per_worker
            try:
                return ray.get(self.worker.fit.remote(cfg, storage, run_name)), retries
            except ray.exceptions.RayActorError as exc:  # the process died; a trial's own error is a RayTaskError
                self.worker = None
                self.replaced += 1
                if retries >= cfg.resources.max_failures:
                    raise RuntimeError(f"the trial's worker died ({retries} retries, train.max_failures "
                                       f"{cfg.resources.max_failures}): {exc}") from None
                retries += 1
                progress.info(f"  [dim]slot {self.index}: the trial's worker died; retrying on a fresh one "
                              f"({retries}/{cfg.resources.max_failures})[/]")
                if on_retry is not None:
                    on_retry(retries)

    def close_worker(self) -> None:
        import ray

        if self.worker is not None:
            ray.kill(self.worker)
            self.worker = None

    def close(self) -> None:
        import ray

        self.close_worker()
        if self.monitor is not None:
            ray.kill(self.monitor)
            self.monitor = None

