"""How a fit runs, decided in one place (`run_fit`): on a warm actor, or as a Ray Train run.

A fit with one worker on CPUs runs on a warm `Slot`'s `TrialWorker`: a long-lived Ray actor with torch
imported that runs the one train loop (`tasks.train.warm.fit_here`) once per call and keeps the decoded
soft-target rows of each cache key between calls; anything else (`train.workers` > 1, GPUs, KDFLOW_WARM=0)
is a Ray Train run (`tasks.train.ray_train.fit`), whose start-up is small beside data-parallel work.

A `kdflow run` keeps one such actor for its stages (`run_worker`), and a search keeps one per trial slot
(each of its `concurrency` slots runs trial after trial on its actor). A trial is then one actor call, and its cost is its epochs (docs/architecture.md has the measurements). A pruned trial returns from its call at the epoch it was pruned, so its slot takes the
next trial at once. An actor that dies mid-trial (its process killed, the node lost) is replaced by a
fresh one and the trial retried, up to `train.max_failures` times, from its newest checkpoint; after
that the trial fails with the error recorded. Trials with `train.workers > 1` (or GPUs) still run as Ray
Train runs, whose start-up is small beside data-parallel work. Every trial's epochs are judged by the
search's one pruning monitor (`study.TrialMonitor`), which slot 0 may hold from the run's start.

A `kdflow run` keeps one more such actor for its stages (`run_worker`): started as soon as Ray is up,
it trains the teacher, computes the soft-target shards of a small precompute and trains the student,
so a single-worker CPU run starts torch once instead of once per stage and per shard task; a search
takes it as its slot 0, with its other slots started at the same time (`run_slots`).
KDFLOW_WARM=0 turns every warm path off (trials, stages, shards), for benchmarks that compare both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator import progress
from orchestrator.runtime import warm_enabled
from tasks.storage import Storage
from tasks.train.config import FitConfig
from tasks.train.result import FitResult

if TYPE_CHECKING:
    from orchestrator.spec import SearchSpec, TrainSpec


class TrialWorker:
    """One warm trial process. `fit` is a whole single-worker fit; rows stay cached by cache key."""

    def __init__(self) -> None:
        from tasks.train.warm import warm_up

        warm_up()  # torch and what a fit's first epoch imports, here and not in the first trial

        self.cache: dict[Any, Any] = {}
        self.fits = 0
        self.shards = 0

    def fit(self, cfg: FitConfig, storage: Storage, run_name: str) -> FitResult:
        from tasks.trace import span
        from tasks.train.warm import fit_here, with_cache

        self.fits += 1
        with span("actor fit"):
            return fit_here(with_cache(cfg, self.cache), storage=storage, run_name=run_name)

    def shard(self, *args: Any, threads: int = 1) -> list[dict[str, Any]]:
        """One task's soft-target shards (`tasks.store.precompute.compute_shards`' arguments), written from
        this process."""
        from tasks.store.precompute import compute_shards

        self.shards += 1  # tasks run, failed ones included
        return compute_shards(*args, threads=threads)

    def info(self) -> dict[str, Any]:
        """The process, how many fits and shards it ran, and the cache keys whose rows it holds."""
        return {"pid": os.getpid(), "fits": self.fits, "shards": self.shards,
                "cache_keys": sorted({k[1] for k in self.cache})}


def warm_fits(cfg: FitConfig) -> bool:
    """Whether a fit runs on a warm actor: one worker on CPUs (else a Ray Train run)."""
    return warm_enabled() and cfg.resources.workers == 1 and not cfg.resources.use_gpu


def start_worker(cpus: float) -> Any:
    import ray

    return ray.remote(num_cpus=cpus, max_restarts=0, max_concurrency=1)(TrialWorker).remote()


class Slot:
    """One of a search's `concurrency` trial slots (or a run's stage worker, `run_worker`): its actors are
    started on first use and kept."""

    def __init__(self, index: int, label: str | None = None) -> None:
        self.index = index
        self.label = label or f"slot {index}"
        self.monitor: Any = None
        self.worker: Any = None
        self.worker_cpus: float | None = None
        self.replaced = 0  # workers replaced after they died

    def start(self, cpus: float) -> Any:
        """The slot's worker for fits of `cpus` CPUs: the running one, or a fresh one (its start is not awaited)."""
        if self.worker is None or self.worker_cpus != cpus:
            self.close_worker()
            self.worker, self.worker_cpus = start_worker(cpus), cpus
        return self.worker

    def fit(self, cfg: FitConfig, storage: Storage, run_name: str, on_retry: Any = None) -> tuple[FitResult, int]:
        """One fit on the slot's warm worker; returns the result and how many times it was retried."""
        import ray

        retries = 0
        while True:
            self.start(cfg.resources.cpus_per_worker)
            try:
                return ray.get(self.worker.fit.remote(cfg, storage, run_name)), retries
            except ray.exceptions.RayActorError as exc:  # the process died; a trial's own error is a RayTaskError
                self.lost()
                if retries >= cfg.resources.max_failures:
                    raise RuntimeError(f"the warm worker died ({retries} retries, train.max_failures "
                                       f"{cfg.resources.max_failures}): {exc}") from None
                retries += 1
                progress.info(f"  [dim]{self.label}: the worker died; retrying on a fresh one from its newest "
                              f"checkpoint ({retries}/{cfg.resources.max_failures})[/]")
                if on_retry is not None:
                    on_retry(retries)

    def shard(self, *args: Any, threads: int = 1) -> list[dict[str, Any]]:
        """One task's soft-target shards on the slot's worker. A dead worker is dropped (the next call starts a
        fresh one) and the error raised: the store retries the task as it retries a failed Ray task."""
        import ray

        worker = self.start(self.worker_cpus if self.worker_cpus is not None else 1)
        try:
            return list(ray.get(worker.shard.remote(*args, threads=threads)))
        except ray.exceptions.RayActorError:
            self.lost()
            raise

    def ready(self) -> None:
        """Wait until the slot's worker, if it has one starting, has booted (torch imported, `warm_up` done),
        so that a trial is asked of the study only when a process can run it: a trial's time in the study is
        then its own, not a process start's. A worker that failed to start is dropped (its first fit starts
        another and reports the error)."""
        import ray

        if self.worker is None:
            return
        try:
            ray.get(self.worker.info.remote())
        except ray.exceptions.RayError:
            self.lost()

    def lost(self) -> None:
        """The worker died (or never started): dropped, so the next call starts a fresh one."""
        self.worker = None
        self.replaced += 1

    def info(self) -> dict[str, Any] | None:
        """The worker's `TrialWorker.info` and how many workers were replaced; None when none runs."""
        import ray

        if self.worker is None:
            return None
        try:
            return {**ray.get(self.worker.info.remote(), timeout=30), "replaced": self.replaced}
        except ray.exceptions.RayError:
            return None

    def close_worker(self) -> None:
        import ray

        if self.worker is not None:
            ray.kill(self.worker)
            self.worker = None

    def start_monitor(self) -> None:
        """Start the search's pruning monitor on this slot now, idle (Optuna imported), so the first trial
        does not wait for it; the search uses slot 0's (`runner.Search.watch`)."""
        if self.monitor is None:
            from orchestrator.search.study import start_monitor

            self.monitor = start_monitor()

    def close(self) -> None:
        import ray

        self.close_worker()
        if self.monitor is not None:
            ray.kill(self.monitor)
            self.monitor = None



def run_worker(train: TrainSpec, eager: bool) -> Slot | None:
    """The run's warm actor for its single-worker CPU stages (teacher, small precompute, student, the kind's
    variants), or None when they run on Ray Train (`train.workers` > 1, GPUs, KDFLOW_WARM=0). `eager` starts
    its process now, while the driver goes on (MLflow, teacher setup); else on first use."""
    if not warm_enabled() or train.workers != 1 or train.use_gpu:
        return None
    slot = Slot(0, label="warm worker")
    if eager:
        slot.start(train.cpus_per_worker)
    else:
        slot.worker_cpus = train.cpus_per_worker
    return slot


def run_slots(train: TrainSpec, search: SearchSpec | None, cluster_cpus: float) -> list[Slot]:
    """The run's warm actors, all started now (their processes boot while the driver opens MLflow and the
    teacher trains): slot 0 (`run_worker`) for the run's single-worker CPU stages, and with a search of
    such trials, `search.concurrency - 1` more slots and the search's pruning monitor. Slot 0 is then the
    search's first trial slot, so no trial waits for a process to start (docs/architecture.md). The extra
    slots start early only when they leave a CPU of the cluster free (a large precompute's shard tasks
    need one); else the search starts them itself. [] when the stages run on Ray Train."""
    warm = run_worker(train, eager=True)
    if warm is None:
        return []
    slots = [warm]
    if search is not None:
        warm.label = "slot 0"
        cpus = train.cpus_per_worker
        if search.concurrency * cpus + 1 <= cluster_cpus:
            for i in range(1, search.concurrency):
                slots.append(Slot(i))
                slots[-1].start(cpus)
        warm.start_monitor()
    return slots


@dataclass
class Fitted:
    """A finished fit, and where it ran: the index of the warm slot (None: a Ray Train run) and how many
    times a dead warm actor was replaced during it."""

    result: FitResult
    slot: int | None = None
    retries: int = 0


def run_fit(cfg: FitConfig, storage: Storage, run_name: str, slot: Slot | None = None,
            on_retry: Any = None) -> Fitted:
    """A fit, where it runs best: on `slot`'s warm actor when there is one and the fit is single-worker on CPUs
    (a dead actor replaced and the fit resumed from its newest checkpoint, up to `train.max_failures`), else
    as a Ray Train run."""
    if slot is not None and warm_fits(cfg):
        result, retries = slot.fit(cfg, storage, run_name, on_retry=on_retry)
        return Fitted(result, slot.index, retries)
    from tasks.train.ray_train import fit

    return Fitted(fit(cfg, storage=storage, run_name=run_name))
