"""MLflow for a search: a nested run per trial, the search's outcome and plots on the workflow's run."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator import progress


class TrialRuns:
    """A nested MLflow run per trial, through MlflowClient: the fluent active-run stack is thread-local.

    A trial's run is created as it starts (its id goes on the Optuna trial, so a resumed search can close
    the run of a trial a killed driver left behind), and its metrics, tags and end are written after it,
    all by one background thread in order (`start_later`, `finish_later`) while the slot trains; `flush`
    waits for them all before the search's outcome is logged."""

    def __init__(self, study: str, parent_id: str | None, experiment: str) -> None:
        """`parent_id`: the workflow's run (pipeline.py), under which the trials nest; None: top-level runs
        in `experiment`."""
        import mlflow
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.pending: list[Future[None]] = []
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdflow-trial-runs")
        self.study = study
        self.parent_id = parent_id
        self.inputs: list[Any] = []  # the workflow run's dataset inputs (data splits, soft targets): each trial's too
        if parent_id:
            parent = self.client.get_run(parent_id)
            self.experiment_id = parent.info.experiment_id
            self.inputs = list(parent.inputs.dataset_inputs) if parent.inputs else []
        else:
            found = mlflow.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)

    def start(self, number: int, values: dict[str, Any]) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {"kdflow.search.study": self.study, "kdflow.search.trial": str(number)}
        if self.parent_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=tags)
        params = [Param(k, str(v)[:500]) for k, v in values.items()] + [Param("trial", str(number))]
        self.client.log_batch(run.info.run_id, params=params)
        if self.inputs:
            self.client.log_inputs(run.info.run_id, datasets=self.inputs)
        return run.info.run_id

    def start_later(self, number: int, values: dict[str, Any], on_id: Any) -> Future[str]:
        """`start`, on the background thread (a trial no longer waits 8-40 ms for MLflow before its fit);
        `on_id(run_id)` is called there once the run exists (the id goes on the Optuna trial)."""
        def start() -> str:
            run_id = self.start(number, values)
            on_id(run_id)
            return run_id

        return self.writer.submit(start)

    def finish(self, run_id: str, state: str, history: list[dict[str, float]], final: dict[str, float],
               error: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(h["epoch"])) for h in history for k, v in h.items()
                   if k != "epoch" and isinstance(v, (int, float))]
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])
        self.client.set_tag(run_id, "kdflow.trial.state", state)
        if error:
            self.client.set_tag(run_id, "kdflow.error", error.strip().splitlines()[-1][:4000])
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED"))

    def finish_later(self, run_id: str, state: str, history: list[dict[str, float]], final: dict[str, float],
                     error: str | None = None) -> None:
        """`finish`, on the background thread (in the order called)."""
        self.pending.append(self.writer.submit(self.finish, run_id, state, list(history), dict(final), error))

    def flush(self) -> None:
        """Wait for every `finish_later`; raise the first that failed."""
        pending, self.pending = self.pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def log_search(self, summary: dict[str, Any], plots: Path | None) -> None:
        if not self.parent_id:
            return
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param("search.study", summary["study"]), Param("search.best_trial", str(summary["best_trial"]))]
        params += [Param(f"search.best.{k}", str(v)[:500]) for k, v in summary["best"].items()]
        counts = [Metric(f"search_{k}", float(summary[k]), now, 0) for k in ("completed", "pruned", "failed")]
        self.client.log_batch(self.parent_id, metrics=counts, params=params)
        self.client.set_tag(self.parent_id, "kdflow.search.study", summary["study"])
        if plots is not None and any(plots.iterdir()):
            self.client.log_artifacts(self.parent_id, str(plots), artifact_path="search")


def write_plots(study: Any, objectives: list[tuple[str, str]], folder: Path) -> list[str]:
    """Optimisation history, parameter importances and (several objectives) the Pareto front: PNG + HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm

    names = [m for m, _ in objectives]
    jobs: list[tuple[str, Any, Any, dict[str, Any]]] = []
    if len(names) == 1:
        jobs.append(("history", pv.plot_optimization_history, pm.plot_optimization_history,
                     {"target_name": names[0]}))
        jobs.append(("importances", pv.plot_param_importances, pm.plot_param_importances,
                     {"target_name": names[0]}))
    else:
        for i, name in enumerate(names):
            target = {"target": lambda t, i=i: t.values[i], "target_name": name}
            jobs.append((f"history-{name}", pv.plot_optimization_history, pm.plot_optimization_history, target))
            jobs.append((f"importances-{name}", pv.plot_param_importances, pm.plot_param_importances, target))
        if len(names) <= 3:
            jobs.append(("pareto", pv.plot_pareto_front, pm.plot_pareto_front, {"target_names": names}))
    written: list[str] = []
    for name, plotly_fn, mpl_fn, kwargs in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plotly_fn(study, **kwargs).write_html(folder / f"{name}.html", include_plotlyjs="cdn")
                ax = mpl_fn(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
            written.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances need 2+ trials
            progress.info(f"  [dim]no {name} plot: {exc}[/]")
    return written
