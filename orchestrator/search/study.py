"""The Optuna side of a search: where the study lives, its name, sampler and pruner, and the epoch hook.

Kept free of torch and of the training code: the `TrialMonitor` actor imports only this module (and
Optuna), so each trial's hook starts in a fraction of a second.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tasks.errors import UserError
from tasks.layout import local_state_dir

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
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


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
    """The epoch hook of one trial: rank 0 of its Ray Train run calls `report` once per epoch.

    It records the epoch's metrics and, when the study prunes, reports the objective's value to Optuna
    and answers `should_prune()` itself, with the study loaded from the same storage URL. That answer is
    synchronous and exact (the pruner sees every other trial's values as stored), where an actor that
    only held a flag set by a polling driver thread would answer one epoch late and need a thread per
    trial. The actor is pinned to the driver's node, so a sqlite or journal file path means the same
    file for both. It takes no CPU. A search keeps one per trial slot and `begin`s it for each trial
    (the study stays loaded: starting an actor per trial cost more than a short trial's epochs). The
    last epoch is reported but never pruned: the run is over, and a finished trial is a candidate.
    """

    def __init__(self, url: str | None = None, study: str = "", trial_id: int = -1, pruner: Any = None,
                 metric: str | None = None, last_epoch: int = 0) -> None:
        """With a url: watch that trial now. Without: an idle monitor (Optuna imported) that a search
        `begin`s for its first trial, started before the search so that trial does not wait for it."""
        import optuna  # noqa: F401 - imported once here, not at the first trial

        self.loaded: dict[str, Any] = {}  # (url, study) -> the study, loaded once
        self.epochs: list[dict[str, float]] = []
        self.metric, self.last_epoch, self.trial = None, 0, None
        if url is not None:
            self.begin(url, study, trial_id, pruner, metric, last_epoch)

    def begin(self, url: str, study: str, trial_id: int, pruner: Any, metric: str | None,
              last_epoch: int) -> None:
        """Watch another trial (of this or another study) from its first epoch."""
        self.metric = metric
        self.last_epoch = last_epoch
        self.epochs: list[dict[str, float]] = []
        self.trial = None
        if metric is not None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            key = f"{url}\n{study}"
            if key not in self.loaded:
                self.loaded[key] = optuna.load_study(study_name=study, storage=open_storage(url), pruner=pruner,
                                                     sampler=optuna.samplers.RandomSampler())
            loaded = self.loaded[key]
            loaded.pruner = pruner
            self.trial = optuna.trial.Trial(loaded, trial_id)

    def report(self, epoch: int, metrics: dict[str, float]) -> bool:
        # a trial retried from its checkpoint repeats the epochs after it: keep the newest of each
        repeated = any(int(e["epoch"]) >= epoch for e in self.epochs)
        self.epochs = [e for e in self.epochs if int(e["epoch"]) < epoch] + [dict(metrics)]
        if self.trial is None or self.metric not in metrics:
            return False
        if not repeated:  # Optuna keeps the first value of a step (and warns about a second)
            self.trial.report(float(metrics[self.metric]), epoch)
        return epoch < self.last_epoch and bool(self.trial.should_prune())

    def history(self) -> list[dict[str, float]]:
        return self.epochs


def start_monitor(*args: Any) -> Any:
    """A TrialMonitor on the driver's node (a sqlite or journal path must mean the same file), watching the
    trial `args` name (`TrialMonitor`'s), or idle without them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0)(TrialMonitor)
    return actor.options(scheduling_strategy=here).remote(*args)
