"""The Optuna side of a search: where the study lives, its name, sampler and pruner, and the epoch hook.

Kept free of torch and of the training code: the `TrialMonitor` actor imports only this module (and
Optuna), so each trial's hook starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.errors import UserError
from tasks.layout import local_state_dir, sqlite_lock

if TYPE_CHECKING:
    from orchestrator.spec import SearchSpec, Workflow
    from tasks.storage import Storage


def storage_url(spec: Workflow, storage: Storage) -> str:
    """search.storage, else sqlite beside the soft targets (./.kdflow/optuna.db when the root is on S3)."""
    configured = spec.search.storage if spec.search else None
    if configured:
        if configured.startswith("journal://"):
            return "journal://" + os.path.abspath(configured[len("journal://"):])
        if configured.endswith((".log", ".journal")) and "://" not in configured:
            return "journal://" + os.path.abspath(configured)
        if "://" not in configured:
            raise UserError("an RDB URL (sqlite:///PATH, postgresql://...) or a journal file (PATH.log, "
                            "journal://PATH)", where="search.storage")
        return configured
    return f"sqlite:///{local_state_dir(storage) / 'optuna.db'}"


def open_storage(url: str) -> Any:
    """An Optuna storage for the URL; sqlite waits for its lock instead of failing under concurrent trials."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal://"):]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with sqlite_lock(url):  # a fresh file's tables are created once, as the MLflow store's are
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        if url.startswith("sqlite"):
            _sqlite_wal(storage.engine)
    return storage


def _sqlite_wal(engine: Any) -> None:
    """Write-ahead logging, synced at checkpoints: a commit (a trial asked, an attribute, a value, a tell) no
    longer waits for an fsync of the whole file, and readers do not block the writer. A killed process
    loses nothing committed; only a machine that loses power may lose the last commits, never the file.
    The WAL file works for processes on one machine, which is where kdflow's sqlite study is used."""
    from sqlalchemy import event

    def on_connect(conn: Any, _record: Any) -> None:
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # the connections opened while the storage was set up reconnect with these settings


def display_url(url: str) -> str:
    """The storage URL with any password hidden (it goes to stdout and MLflow)."""
    if url.startswith(("journal://", "sqlite")):
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


def study_name(spec: Workflow, manifest: dict[str, Any]) -> str:
    """search.study, else workflow name + a hash of what the trials depend on, so a rerun finds the study.

    The hash covers the soft-target key, the space, the objectives, the seed and every student, distill
    and train value a trial starts from; not `trials`, `concurrency`, sampler, pruner or the resources
    (a study may be extended with more trials, or continued with another sampler or on more workers).
    """
    search = spec.search
    assert search is not None
    if search.study:
        return search.study
    resources = {"workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "max_failures", "checkpoint_every",
                 "checkpoint_interval_s"}
    basis = {"soft_targets": manifest["key"], "seed": spec.seed, "space": spec.model_dump(mode="json")["search"]["space"],
             "objectives": [o.model_dump() for o in search.objectives], "student": spec.student.model_dump(mode="json"),
             "distill": spec.distill.model_dump(mode="json"),
             "train": spec.train.model_dump(mode="json", exclude=resources)}
    from orchestrator.workspace import digest

    return f"{spec.name}-{digest(basis)[:10]}"


class OptunaTrials:
    """What kdflow needs of Optuna that only its private attributes give: a trial's storage id (the epoch
    hook reopens the trial by it) and marking a trial a killed driver left RUNNING as failed. Kept here,
    in one place, so an Optuna upgrade that renames them breaks one class."""

    def __init__(self, study: Any) -> None:
        self._storage = study._storage

    @staticmethod
    def trial_id(trial: Any) -> int:
        return int(trial._trial_id)

    def fail(self, trial: Any, error: str) -> None:
        from optuna.trial import TrialState

        self._storage.set_trial_user_attr(trial._trial_id, "error", error)
        self._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def make_sampler(search: SearchSpec, seed: int) -> Any:
    import optuna

    startup = min(10, max(2, search.trials // 3))
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "cmaes":
        # CMA-ES handles float/int only; categorical keys (layer widths...) fall back to random sampling
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup,
                                            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                            warn_independent_sampling=False)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, search.trials // 3)))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup,
                                      constant_liar=search.concurrency > 1)


def make_pruner(search: SearchSpec, epochs: int) -> Any:
    """The pruner; steps are epochs (1-based). Optuna cannot prune multi-objective studies: none there."""
    import optuna

    if search.pruner == "none" or len(search.objectives) > 1 or search.objectives[0].metric == "num_params":
        return optuna.pruners.NopPruner()
    if search.pruner == "median":
        # the first epochs (a fifth of them, at least one) are never judged: every run starts noisy
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, search.trials // 3)),
                                           n_warmup_steps=max(1, epochs // 5) + 1)
    if search.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)


# ---------------------------------------------------------------- the epoch hook


class TrialMonitor:
    """The search's epoch hook: rank 0 of each trial's fit asks it once per epoch whether to stop.

    One per search, shared by its trial slots (`PruneHook` names the trial). It decides from an in-memory
    copy of the study (Optuna's InMemoryStorage with the same name, directions and pruner): the trials
    stored when the search began (`open`), each running trial's values as they are reported, and each
    trial's final state as the driver records it (`settle`). Optuna's pruners read only that (the
    completed trials' intermediate values, the trial's own, trial numbers, and the rung attributes ASHA
    and Hyperband write), and every trial of the search reports here, so `should_prune` answers as the
    stored study would, without a sqlite write and read per epoch (those cost more than a small student's
    epoch: benchmarks/RESULTS-search.md). A thread writes each reported value (and the pruner's
    attributes) to the stored study behind the trial's back; `end` waits for a trial's writes, so the
    driver tells Optuna the trial's state only once its values are stored. The actor is pinned to the
    driver's node (a sqlite or journal path means the same file) and takes no CPU. The last epoch is
    reported but never pruned: the run is over, and a finished trial is a candidate.
    """

    def __init__(self) -> None:
        import queue
        import threading

        import optuna

        # What opening a stored study imports (SQLAlchemy, Alembic, Optuna's models: 0.27 of a first open's
        # 0.29 s here), paid as the process starts rather than when the search's first trial ends and waits
        # for its values to be stored
        with contextlib.suppress(Exception):
            optuna.storages.RDBStorage("sqlite:///:memory:")
        self.lock = threading.Lock()
        self.mirror: Any = None  # the in-memory copy of the study (None when nothing prunes)
        self.metric: str | None = None
        self.watched: dict[int, dict[str, Any]] = {}  # trial number -> its epochs, trial, stored id
        self.writes: queue.Queue[Any] = queue.Queue()
        self.write_errors: dict[int, str] = {}
        self.stored: Any = None
        self.url = ""
        # the driver does not wait for `open` (nor for this process to start): every other call waits here
        self.opened = threading.Event()
        self.open_error: str | None = None
        threading.Thread(target=self._writer, name="kdflow-study-writer", daemon=True).start()

    def open(self, url: str, name: str, directions: list[str], pruner: Any, metric: str | None,
             trials: list[Any]) -> None:
        """Watch a search of study `name` (stored at `url`): `trials` are its trials as stored now, in order.
        `metric` None: nothing prunes (the epochs are only kept, for a failed trial's record)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.opened.clear()
        try:
            self._open(url, name, directions, pruner, metric, trials)
        except Exception as exc:  # kept: every call that waits for `open` raises it
            self.open_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.opened.set()

    def _open(self, url: str, name: str, directions: list[str], pruner: Any, metric: str | None,
              trials: list[Any]) -> None:
        import optuna

        with self.lock:
            self.metric, self.watched, self.mirror, self.open_error = metric, {}, None, None
            if metric is None:
                return
            self.url, self.stored = url, None  # opened by the writer, now: the first trial does not wait for
            # SQLAlchemy's import and the storage's set-up (seconds in a fresh process under load), and its end
            # (which waits for its writes) no longer waits for them either (~160 ms here)
            self.writes.put(self._open_stored)
            self.mirror = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name=name,
                                              directions=directions, pruner=pruner,
                                              sampler=optuna.samplers.RandomSampler())
            for t in sorted(trials, key=lambda t: t.number):
                self._placeholders(t.number)  # numbers are dense in a study; a gap stays a waiting placeholder
                self.mirror._storage.create_new_trial(self.mirror._study_id, template_trial=t)

    def _mirror_id(self, number: int) -> int:
        """The mirror's id of trial `number`, with waiting placeholders for numbers not seen yet (trials asked
        by the other slots, which begin here in any order): the number is what Hyperband's brackets hash."""
        self._placeholders(number + 1)
        return int(self.mirror._storage.get_trial_id_from_study_id_trial_number(self.mirror._study_id, number))

    def _placeholders(self, count: int) -> None:
        """Waiting trials until the mirror has `count` (a waiting trial is one no pruner reads)."""
        from optuna.trial import FrozenTrial, TrialState

        storage, study_id = self.mirror._storage, self.mirror._study_id
        while storage.get_n_trials(study_id) < count:
            storage.create_new_trial(study_id, template_trial=FrozenTrial(
                number=-1, trial_id=-1, state=TrialState.WAITING, value=None, values=None, datetime_start=None,
                datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                intermediate_values={}))

    def _wait_open(self) -> None:
        if not self.opened.wait(timeout=600):
            raise RuntimeError("the pruning monitor was never opened on a study")
        if self.open_error:
            raise RuntimeError(f"the pruning monitor could not open the study: {self.open_error}")

    def begin(self, number: int, stored_id: int, last_epoch: int) -> None:
        """Watch trial `number` (`stored_id` its id in the stored study) from its first epoch (its first
        `report` does this when no `begin` came first)."""
        import optuna
        from optuna.trial import TrialState

        self._wait_open()
        with self.lock:
            if number in self.watched:
                return
            watched: dict[str, Any] = {"epochs": [], "last": last_epoch, "stored_id": stored_id, "trial": None,
                                       "attrs": {}}
            if self.mirror is not None:
                mirror_id = self._mirror_id(number)
                self.mirror._storage.set_trial_state_values(mirror_id, TrialState.RUNNING)
                watched["trial"] = optuna.trial.Trial(self.mirror, mirror_id)
            self.watched[number] = watched

    def report(self, number: int, epoch: int, metrics: dict[str, float], stored_id: int = -1,
               last_epoch: int = 0) -> bool:
        self.begin(number, stored_id, last_epoch)
        with self.lock:
            w = self.watched[number]
            # a trial retried from its checkpoint repeats the epochs after it: keep the newest of each
            repeated = any(int(e["epoch"]) >= epoch for e in w["epochs"])
            w["epochs"] = [e for e in w["epochs"] if int(e["epoch"]) < epoch] + [dict(metrics)]
            trial = w["trial"]
            if trial is None or self.metric not in metrics:
                return False
            if not repeated:  # Optuna keeps the first value of a step (and warns about a second)
                value = float(metrics[self.metric])
                trial.report(value, epoch)
                self.writes.put((number, w["stored_id"], "value", epoch, value))
            prune = epoch < w["last"] and bool(trial.should_prune())
            # ASHA and Hyperband note a trial's rungs in its system attributes: stored too
            attrs = self.mirror._storage.get_trial_system_attrs(trial._trial_id)
            for key, value in attrs.items():
                if w["attrs"].get(key) != value:
                    w["attrs"][key] = value
                    self.writes.put((number, w["stored_id"], "attr", key, value))
            return prune

    def _writer(self) -> None:
        """Writes reported values and pruner attributes to the stored study, one at a time, in order."""
        while True:
            item = self.writes.get()
            try:
                if callable(item):  # `end`'s marker: everything before it is written
                    item()
                    continue
                number, stored_id, kind, key, value = item
                if number in self.write_errors:
                    continue
                if self.stored is None:
                    self.stored = open_storage(self.url)
                if kind == "value":
                    self.stored.set_trial_intermediate_value(stored_id, key, value)
                else:
                    self.stored.set_trial_system_attr(stored_id, key, value)
            except Exception as exc:  # noqa: BLE001 - reported to the trial's `end`
                self.write_errors[number] = f"{type(exc).__name__}: {exc}"
            finally:
                self.writes.task_done()

    def _open_stored(self) -> None:
        """The stored study, opened on the writer's thread; a failure is left to the first write to report."""
        if self.stored is None:
            with contextlib.suppress(Exception):
                self.stored = open_storage(self.url)

    def end(self, number: int) -> list[dict[str, float]]:
        """The epochs trial `number` reported, once its values are in the stored study (raises if a write
        failed: the trial then fails, as an epoch whose report failed did before)."""
        import threading

        self._wait_open()
        done = threading.Event()
        self.writes.put(done.set)
        done.wait()
        with self.lock:
            epochs = self.watched.get(number, {}).get("epochs", [])
        error = self.write_errors.pop(number, None)
        if error:
            raise RuntimeError(f"the trial's values could not be stored: {error}")
        return epochs

    def history(self, number: int) -> list[dict[str, float]]:
        """The epochs trial `number` reported so far (what a failed trial's MLflow run can still show)."""
        self._wait_open()
        with self.lock:
            return list(self.watched.get(number, {}).get("epochs", []))

    def settle(self, number: int, state: str, values: list[float] | None) -> None:
        """Trial `number` is over with `state` (an Optuna TrialState name): later decisions count it so."""
        from optuna.trial import TrialState

        self._wait_open()
        with self.lock:
            self.watched.pop(number, None)
            if self.mirror is not None:
                mirror_id = self._mirror_id(number)
                if not self.mirror._storage.get_trial(mirror_id).state.is_finished():
                    self.mirror._storage.set_trial_state_values(mirror_id, TrialState[state], values)


@dataclass(frozen=True)
class PruneHook:
    """A trial's epoch hook (`FitConfig.epoch_hook`): the search's monitor, asked about this trial."""

    monitor: Any
    number: int
    stored_id: int  # the trial's id in the stored study
    last_epoch: int  # reported, never pruned

    def ask(self, epoch: int, metrics: dict[str, float]) -> Callable[[], bool]:
        """Send the epoch's report now; the returned function waits for the monitor's answer (prune or not)."""
        import ray

        ref = self.monitor.report.remote(self.number, epoch, metrics, self.stored_id, self.last_epoch)
        return lambda: bool(ray.get(ref))


def start_monitor() -> Any:
    """A search's TrialMonitor on the driver's node (a sqlite or journal path must mean the same file), idle
    until `open`ed. Threaded: `end` waits for the stored writes while other trials report."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(TrialMonitor)
    return actor.options(scheduling_strategy=here).remote()
