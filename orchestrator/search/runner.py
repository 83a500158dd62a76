"""Distillation-aware hyperparameter search: an Optuna study in the driver, each trial a call on a warm actor.

`concurrency` driver threads (trial slots, `fitting.Slot`) each run `study.optimize(objective, n_trials=1)`
until the study has its trials; each objective trains one student from the soft targets the pipeline
computed once: a single-worker CPU trial on its slot's long-lived `TrialWorker` actor (the one train
loop, rows kept decoded), a data-parallel one as a Ray Train run (`train.fit`). Per-epoch values reach
the pruner through the slot's `study.TrialMonitor` actor. The study lives in an Optuna storage
(sqlite under the storage root by default), so rerunning an interrupted workflow finds it, keeps its
finished trials and runs only the missing ones. Each finished trial's best weights go to
`search/<study>/trial-N.pt` under the storage root; the chosen student is restored from there. MLflow
gets a nested run per trial and the study's plots on the workflow's run (`tracking.py`).
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import progress, stages
from orchestrator.configs import student_fit_config
from orchestrator.fitting import Slot, run_fit
from orchestrator.search.selection import Candidate, pareto_front, select_trial
from orchestrator.search.space import Space, apply, check_space
from orchestrator.search.study import (
    OptunaTrials,
    PruneHook,
    display_url,
    make_pruner,
    make_sampler,
    open_storage,
    start_monitor,
    storage_url,
    study_name,
)
from orchestrator.search.tracking import TrialRuns, write_plots
from orchestrator.spec import Workflow
from tasks.errors import StageFailed, UserError
from tasks.layout import checkpoints_path, trial_weights_path
from tasks.models import num_params
from tasks.storage import Storage
from tasks.trace import span
from tasks.train.result import FitResult, StopReason


@dataclass
class SearchOutcome:
    summary: dict[str, Any]  # the result JSON's "search" section
    spec: Workflow  # the chosen trial's full workflow
    result: FitResult  # the chosen student, restored from its trial's weights (or retrained)


# ---------------------------------------------------------------- weights of a finished trial


def save_weights(storage: Storage, path: str, result: FitResult) -> None:
    storage.write_torch(path, {"state_dict": result.state_dict, "history": result.history,
                               "stop_reason": result.stop_reason.value, "best_epoch": result.best_epoch,
                               "samples_per_s": result.samples_per_s, "workers": result.workers})


def load_weights(storage: Storage, path: str) -> FitResult:
    saved = storage.read_torch(path)
    return FitResult(state_dict=saved["state_dict"], history=saved["history"],
                     stop_reason=StopReason(saved["stop_reason"]), resumed_from=None, best_epoch=saved["best_epoch"],
                     samples_per_s=saved["samples_per_s"], workers=saved.get("workers", 1))


def train_seconds(history: list[dict[str, float]]) -> float:
    """Seconds a fit spent in training steps (each epoch's `epoch_s`: no validation, start-up or checkpoint)."""
    return float(sum(h.get("epoch_s", 0.0) for h in history))


def best_epoch_metrics(result: FitResult) -> dict[str, float]:
    """The metrics of the epoch whose weights were kept (the last epoch when nothing was validated)."""
    by_epoch = {int(h["epoch"]): h for h in result.history}
    return dict(by_epoch.get(result.best_epoch, result.history[-1]))


# ---------------------------------------------------------------- the search


def _fmt(values: dict[str, Any]) -> str:
    """Trial values for a progress line (escaped: a list such as [16] must not read as rich markup)."""
    from rich.markup import escape

    return escape("{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                  for k, v in values.items()) + "}")


class Search:
    """One run of a study: resume it, run the missing trials `concurrency` at a time, pick the student."""

    def __init__(self, spec: Workflow, manifest: dict[str, Any], storage: Storage, parent_run_id: str | None,
                 slots: list[Slot] | None = None) -> None:
        """`slots`: trial slots already started (the run's warm actor first, `fitting.run_slots`), owned by the
        caller; the search starts (and closes) any more it needs."""
        import optuna

        assert spec.search is not None
        self.spec, self.manifest, self.storage = spec, manifest, storage
        self.kind = spec.kind
        self.search = spec.search
        self.objectives = [(o.metric, o.direction) for o in self.search.objectives]
        self.space = Space(self.search.space)
        self.url = storage_url(spec, storage)
        self.name = study_name(spec, manifest)
        self.pruner = make_pruner(self.search, spec.train.epochs)
        self.prunes = not isinstance(self.pruner, optuna.pruners.NopPruner)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # kdflow prints its own line per trial
        try:
            self.study = optuna.create_study(
                study_name=self.name, storage=open_storage(self.url), load_if_exists=True,
                sampler=make_sampler(self.search, spec.seed if self.search.seed is None else self.search.seed),
                pruner=self.pruner,
                directions=[d for _, d in self.objectives])
        except ValueError as exc:  # an existing study of this name with other directions
            raise UserError(f"study {self.name!r}: {exc}", where="search.study") from None
        self.trials = OptunaTrials(self.study)
        self.runs = TrialRuns(self.name, parent_run_id, spec.experiment)
        self.train_s = 0.0  # training-step seconds of the trials run here (summed in several threads)
        self.lock = threading.Lock()
        self.slots = list(slots or [])
        self.slot_trials: dict[int, int] = {}  # slot index -> trials it ran
        self.slot_info: list[dict[str, Any]] = []  # the slots' workers, for the summary
        # the search's pruning monitor (slot 0's when the run started one), opened on this study
        self.monitor: Any = None
        self.monitor_owned = False
        self.monitor_lock = threading.Lock()
        self.finished: dict[int, Any] = {}  # number -> the study's complete and pruned trials (progress lines)

    # ------------------------------------------------ resume

    def resume(self) -> int:
        """Fail the trials a killed driver left RUNNING; return how many trials are still to run.

        A study may be shared: several users' searches (search.study, search.storage) run its trials at
        once. A RUNNING trial is failed only when the driver that runs it is gone (its `driver` attribute:
        a process on this host that no longer exists, or a trial from before drivers were recorded); one
        on another host is left to its driver, and counts towards the study's trials.
        """
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if driver_alive(t.user_attrs.get("driver")):
                progress.info(f"  trial #{t.number} is running in another search ({t.user_attrs['driver']})")
                continue
            self.fail_interrupted(t)
        self.finished = {t.number: t for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
        done = len(self.finished)
        if done:
            progress.info(f"  resuming study {self.name}: {done} of {self.search.trials} trials already done")
        return max(0, self.search.trials - done)

    def fail_interrupted(self, t: Any) -> None:
        from mlflow.exceptions import MlflowException

        self.trials.fail(t, "interrupted: the driver stopped during this trial")
        if t.user_attrs.get("mlflow_run_id"):
            try:
                self.runs.client.set_terminated(t.user_attrs["mlflow_run_id"], "KILLED")
            except MlflowException as exc:  # e.g. the old run lives in another tracking server
                progress.info(f"  [dim]MLflow run of trial #{t.number} left as it was: {exc}[/]")
        if t.user_attrs.get("ray_train_run"):  # its half-trained checkpoints are of no use
            self.storage.rm(checkpoints_path(self.storage, t.user_attrs["ray_train_run"]))
        progress.info(f"  trial #{t.number} was interrupted: marked failed, it does not count")

    def study_full(self) -> bool:
        """The study has its trials, counting those other searches on it are running now."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return len(self.study.get_trials(deepcopy=False, states=states)) >= self.search.trials

    # ------------------------------------------------ one trial

    def objective(self, trial: Any, slot: Slot | None = None) -> float | tuple[float, ...]:
        """One trial: its values applied, one student trained on Ray, its weights kept when it completes.

        On a slot, the trial's monitor (and for a single CPU worker, its fit) runs on the slot's warm actors."""
        trial.set_user_attr("driver", DRIVER)  # whose trial this is, for a search that resumes the study
        with span("suggest", trial=trial.number):
            values = self.space.suggest(trial)
        started = self.runs.start_later(trial.number, values, functools.partial(trial.set_user_attr, "mlflow_run_id"))
        progress.info(f"  [dim]trial #{trial.number} started {_fmt(values)}[/]")
        run_name = f"{self.name}-trial-{trial.number}-{uuid.uuid4().hex[:6]}"
        trial.set_user_attr("ray_train_run", run_name)
        try:
            result, size = self.train_trial(trial, values, run_name, slot, started)
        finally:
            with span("checkpoint rm", trial=trial.number):
                self.storage.rm(checkpoints_path(self.storage, run_name))  # the best weights are kept below
        return self.conclude(trial, result, started.result(), size)

    def train_trial(self, trial: Any, values: dict[str, Any], run_name: str, slot: Slot | None,
                    started: Future[str]) -> tuple[FitResult, int]:
        """The trial's student and its size; a failure is recorded on the trial and its MLflow run, then raised."""
        hook: PruneHook | None = None
        size: int | None = None
        try:
            trial_spec = apply(self.spec, values)
            size = num_params(self.kind.build_model(trial_spec.student.model, trial_spec.student.params,
                                                    self.kind.dims(self.manifest)))
            trial.set_user_attr("num_params", size)
            with span("monitor begin", trial=trial.number):
                hook = self.watch(trial, trial_spec.train.epochs)
            cfg = student_fit_config(trial_spec, self.manifest, self.storage, hook,
                                     concurrent=self.search.concurrency)
            with span("fit", trial=trial.number):
                fitted = run_fit(cfg, self.storage, run_name, slot=slot,
                                 on_retry=functools.partial(trial.set_user_attr, "retries"))
            if fitted.slot is not None:
                trial.set_user_attr("slot", fitted.slot)
            trial.set_user_attr("resumed_from", fitted.result.resumed_from)
            with span("monitor end", trial=trial.number):
                self.ended(hook)  # the trial's values are in the stored study before Optuna is told its state
            with span("mlflow start", trial=trial.number):
                started.result()  # created while the trial trained: its id is on the trial before the tell
            return fitted.result, size
        except Exception as exc:
            history = self.monitored(hook)
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
            trial.set_user_attr("epochs", len(history))
            self.count_train(trial, history)
            if started.exception() is None:  # no run to finish when MLflow could not create one
                self.runs.finish_later(started.result(), "failed", history,
                                       {"num_params": size} if size is not None else {},
                                       error="".join(traceback.format_exception(exc)))
            raise

    def conclude(self, trial: Any, result: FitResult, run_id: str, size: int) -> float | tuple[float, ...]:
        """A trained trial: pruned (raised to Optuna), or complete with its best epoch's weights kept and its
        objective values returned."""
        import optuna

        trial.set_user_attr("epochs", len(result.history))
        self.count_train(trial, result.history)
        if result.stop_reason == StopReason.PRUNED:
            with span("mlflow finish", trial=trial.number):
                self.runs.finish_later(run_id, "pruned", result.history, {"num_params": size})
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        best = best_epoch_metrics(result)
        best["num_params"] = size
        path = trial_weights_path(self.storage, self.name, trial.number)
        with span("save weights", trial=trial.number):
            save_weights(self.storage, path, result)
        trial.set_user_attr("weights", path)
        trial.set_user_attr("best_epoch", result.best_epoch)
        final = {f"best_{m}": float(v) for m, v in best.items() if m.startswith("val_") or m in dict(self.objectives)}
        with span("mlflow finish", trial=trial.number):
            self.runs.finish_later(run_id, "complete", result.history, {**final, "num_params": size,
                                                                  "best_epoch": result.best_epoch})
        objective_values = tuple(float(best[m]) for m, _ in self.objectives)
        return objective_values[0] if len(objective_values) == 1 else objective_values

    def traced_objective(self, trial: Any, slot: Slot | None = None) -> float | tuple[float, ...]:
        with span("objective", trial=trial.number):
            return self.objective(trial, slot)

    def count_train(self, trial: Any, history: list[dict[str, float]]) -> None:
        seconds = train_seconds(history)
        trial.set_user_attr("train_s", seconds)
        with self.lock:
            self.train_s += seconds

    def watch(self, trial: Any, last_epoch: int) -> PruneHook:
        """The trial's epoch hook on the search's monitor; nothing waited for (the trial's first report
        begins it there). A monitor found dead (`ended`, `settle`) is replaced here and opened anew from
        the stored study, which holds every value reported so far."""
        with self.monitor_lock:
            if self.monitor is None:
                self.monitor, self.monitor_owned = start_monitor(), True
                self.open_monitor()
            return PruneHook(self.monitor, trial.number, self.trials.trial_id(trial), last_epoch)

    def open_monitor(self) -> None:
        """The monitor watches this study: its stored trials copied in (`study.TrialMonitor`). Not waited
        for: the first trials start while the monitor's process may still be starting."""
        assert self.monitor is not None
        trials = self.study.get_trials(deepcopy=False) if self.prunes else []
        self.monitor.open.remote(self.url, self.name, [d for _, d in self.objectives], self.pruner,
                                 self.objectives[0][0] if self.prunes else None, trials)

    def monitor_died(self, hook_monitor: Any) -> None:
        with self.monitor_lock:
            if self.monitor is hook_monitor:
                self.monitor = None

    def ended(self, hook: PruneHook | None) -> list[dict[str, float]]:
        """The epochs the trial reported, once its values are stored (raises if they could not be)."""
        if hook is None:
            return []
        import ray

        try:
            return list(ray.get(hook.monitor.end.remote(hook.number)))
        except ray.exceptions.RayActorError:
            self.monitor_died(hook.monitor)
            raise

    @staticmethod
    def monitored(hook: PruneHook | None) -> list[dict[str, float]]:
        """The epochs a failed trial's hook saw (what its MLflow run can still show); its values stored."""
        if hook is None:
            return []
        import ray

        try:
            return list(ray.get(hook.monitor.end.remote(hook.number), timeout=60))
        except (ray.exceptions.RayError, RuntimeError):
            try:
                return list(ray.get(hook.monitor.history.remote(hook.number), timeout=10))
            except ray.exceptions.RayError:
                return []

    def settle(self, trial: Any) -> None:
        """Tell the monitor how the trial ended, so the pruner counts it (a dead monitor is replaced later)."""
        import ray

        monitor = self.monitor
        if monitor is None:
            return
        try:
            ray.get(monitor.settle.remote(trial.number, trial.state.name, trial.values))
        except ray.exceptions.RayActorError:
            self.monitor_died(monitor)

    def on_trial_done(self, study: Any, trial: Any) -> None:
        """The live line: trial k/n, state, params, value, best so far."""
        with span("monitor settle", trial=trial.number):
            self.settle(trial)
        with span("trial done line", trial=trial.number):
            self._trial_done_line(trial)

    def _trial_done_line(self, trial: Any) -> None:
        from rich.markup import escape

        state = trial.state.name.lower()
        params = _fmt(self.space.values(trial.params))
        if state == "fail":
            error = (trial.user_attrs.get("error") or "error").strip().splitlines()[-1]
            progress.info(f"trial #{trial.number} [red]\\[failed][/] {params} {escape(error[:300])}")
            return
        color = "green" if state == "complete" else "yellow"
        with self.lock:
            self.finished[trial.number] = trial
            counted = len(self.finished)
        line = f"trial {counted}/{self.search.trials} #{trial.number} [{color}]\\[{state}][/] {params}"
        if state == "pruned":
            line += f" after epoch {trial.user_attrs.get('epochs', '?')}"
        if trial.values:
            line += " " + " ".join(f"{m}={v:.4g}" for (m, _), v in zip(self.objectives, trial.values))
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        progress.info(f"{line} in {seconds:.0f}s {self.best_so_far()}")

    def best_so_far(self) -> str:
        """From the trials finished so far as the driver saw them (not a read of the whole stored study)."""
        from optuna.trial import TrialState

        with self.lock:
            complete = sorted((t for t in self.finished.values() if t.state == TrialState.COMPLETE),
                              key=lambda t: t.number)
        if not complete:
            return "(no complete trial yet)"
        if len(self.objectives) == 1:
            sign = 1.0 if self.objectives[0][1] == "maximize" else -1.0
            best = max(complete, key=lambda t: sign * float(t.value))  # the first of equal ones
            return f"(best {best.value:.4g}, #{best.number})"
        return f"(Pareto front: {len(pareto_front(self.candidates(complete), self.objectives))} trial(s))"

    def candidates(self, trials: list[Any]) -> list[Candidate]:
        out = []
        for t in trials:
            metrics = {m: float(v) for (m, _), v in zip(self.objectives, t.values)}
            metrics.setdefault("num_params", float(t.user_attrs.get("num_params", 0)))
            out.append(Candidate(t.number, metrics))
        return out

    # ------------------------------------------------ the whole search

    def run(self) -> SearchOutcome:
        """Resume the study, run its missing trials, pick the student and log the search on the workflow's run."""
        from optuna.trial import TrialState

        jobs, wall_s = self.run_missing()
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = {"completed": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                  "failed": sum(t.state == TrialState.FAIL for t in trials)}
        if not complete:
            errors = [t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
            raise StageFailed("search", f"no trial completed ({counts['pruned']} pruned, "
                                        f"{counts['failed']} failed" + (f"; last error: {errors[-1]}"
                                                                        if errors else "") + ")")
        by_number = {t.number: t for t in complete}
        cands = self.candidates(complete)
        chosen = by_number[select_trial(cands, self.objectives, self.search.select).number]
        values = self.space.values(chosen.params)
        chosen_spec = apply(self.spec, values)
        result, restored = self.restore(chosen, chosen_spec)
        summary: dict[str, Any] = {
            "study": self.name, "storage": display_url(self.url), "trials": self.search.trials, **counts,
            "best": values, "best_trial": chosen.number,
            "best_values": {m: v for (m, _), v in zip(self.objectives, chosen.values)},
            "num_params": chosen.user_attrs.get("num_params"), "select": self.search.select, "restored": restored,
            # where the time went: the trials' wall clock here, their summed training steps, and the share
            # of the slots' time that was training (the rest is start-up, validation, bookkeeping)
            "wall_s": round(wall_s, 3), "train_s": round(self.train_s, 3), "concurrency": jobs,
            "efficiency": round(self.train_s / (wall_s * jobs), 3) if jobs and wall_s > 0 else None,
            # the warm trial slots: each one's worker process and the trials it ran (the run's own warm
            # actor is slot 0); [] when trials ran as Ray Train runs
            "slots": self.slot_info,
        }
        if len(self.objectives) > 1:
            summary["pareto"] = [{"trial": c.number, "values": {m: c.metrics[m] for m, _ in self.objectives},
                                  "num_params": int(c.metrics["num_params"]),
                                  "params": self.space.values(by_number[c.number].params)}
                                 for c in pareto_front(cands, self.objectives)]
        progress.info(f"  chose trial #{chosen.number} ({self.search.select}): {_fmt(values)} "
                      + " ".join(f"{m}={v:.4g}" for m, v in summary["best_values"].items()))
        with tempfile.TemporaryDirectory(prefix="kdflow-plots-") as d:
            write_plots(self.study, self.objectives, Path(d))
            self.runs.log_search(summary, Path(d))
        return SearchOutcome(summary=summary, spec=chosen_spec, result=result)

    def run_missing(self) -> tuple[int, float]:
        """The trials a resumed study still lacks, `concurrency` at a time; returns how many ran at once and
        their wall-clock seconds."""
        remaining = self.resume()
        t0 = time.perf_counter()
        if not remaining:
            progress.info(f"  study {self.name} already has {self.search.trials} finished trials: none to run")
            return 0, time.perf_counter() - t0
        jobs = min(self.search.concurrency, remaining)
        note = "" if self.prunes or self.search.pruner == "none" else \
            " (pruning is off: Optuna cannot prune a multi-objective study)"
        progress.info(f"  study {self.name}: {remaining} trial(s), {jobs} at a time, sampler "
                      f"{self.search.sampler}, pruner {self.search.pruner if self.prunes else 'none'}{note}")
        try:
            self.run_trials(remaining, jobs)
        finally:
            with span("mlflow flush"):
                self.runs.flush()  # every trial's MLflow run written before the search ends
        return jobs, time.perf_counter() - t0

    def run_trials(self, n: int, jobs: int) -> None:
        """n trials, `jobs` at a time: each thread asks the study for one trial after another.

        Not `study.optimize(n_jobs=...)`: Optuna reseeds the sampler from OS entropy in every thread it
        starts, so a seeded search would never draw the same values twice. A trial's own error is caught
        and recorded (the trial fails, the search goes on); anything else stops the search.
        """
        left = [n]
        lock = threading.Lock()
        errors: list[BaseException] = []
        if self.slots and self.slots[0].monitor is not None:
            self.monitor = self.slots[0].monitor  # started with the run, idle until now
        else:
            self.monitor, self.monitor_owned = start_monitor(), True
        with span("monitor open"):
            self.open_monitor()

        def run_slot(index: int) -> None:
            owned = index >= len(self.slots)  # a slot the caller started is the caller's to close
            slot = Slot(index) if owned else self.slots[index]
            objective = functools.partial(self.traced_objective, slot=slot)
            try:
                with span("slot ready"):
                    slot.ready()
                while True:
                    with lock:
                        if left[0] == 0 or errors or self.study_full():
                            return
                        left[0] -= 1
                    try:
                        with span("optimize"):
                            self.study.optimize(objective, n_trials=1, catch=(Exception,),
                                                callbacks=[self.on_trial_done], gc_after_trial=False)
                        self.slot_trials[index] = self.slot_trials.get(index, 0) + 1
                    except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
                        errors.append(exc)
                        return
            finally:
                with span("slot info"):
                    info = slot.info()
                if info is not None:
                    with lock:
                        self.slot_info.append({"slot": index, "pid": info["pid"], "replaced": info["replaced"],
                                               "trials": self.slot_trials.get(index, 0)})
                if owned:
                    slot.close()

        threads = [threading.Thread(target=run_slot, args=(i,), name=f"kdflow-trial-slot-{i}", daemon=True)
                   for i in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.monitor is not None and self.monitor_owned:
            import ray

            ray.kill(self.monitor)
        self.monitor = None
        if errors:
            raise errors[0]

    def restore(self, trial: Any, spec: Workflow) -> tuple[FitResult, str]:
        """The chosen trial's weights from its file; retrained with its values if the file is gone."""
        path = trial.user_attrs.get("weights")
        if path and self.storage.exists(path):
            return load_weights(self.storage, path), "checkpoint"
        progress.info(f"  the weights of trial #{trial.number} are gone ({path}): retraining it")
        result = stages.train_student(spec, self.manifest, self.storage,
                                      run_name=f"{self.name}-retrain-{trial.number}-{uuid.uuid4().hex[:6]}",
                                      warm=self.slots[0] if self.slots else None)
        return result, "retrained"


DRIVER = f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(driver: str | None) -> bool:
    """Whether the search process `driver` ("host:pid") may still be running: another host's is taken
    as alive (it cannot be checked from here); this host's, if its process exists and is not this one."""
    if not driver or ":" not in driver:
        return False
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname():
        return True
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_search(spec: Workflow, manifest: dict[str, Any], storage: Storage, parent_run_id: str | None,
               slots: list[Slot] | None = None) -> SearchOutcome:
    """Run (or resume) the workflow's search over the stored soft targets; return the chosen student.

    `parent_run_id` is the workflow's MLflow run: each trial's run nests under it, the outcome is logged on it.
    `slots`: trial slots the run already started (`fitting.run_slots`), kept open for the caller.
    """
    assert spec.search is not None
    check_space(spec, manifest)
    with progress.stage("search", f"{spec.search.trials} trials over {', '.join(spec.search.space)}"):
        return Search(spec, manifest, storage, parent_run_id, slots).run()
