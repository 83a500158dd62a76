"""Runs a workflow's stages in order inside one MLflow run and builds the result object (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

from torch import nn

from orchestrator import evaluation, progress, stages, tracking
from orchestrator.cluster import check_joined
from orchestrator.configs import task_for
from orchestrator.registry import lineage_extras, log_student, prepare_model_logging, register
from orchestrator.runtime import LOCAL_MIN_CPUS, RayStart, ensure_ray, in_background, uses_ray_train
from orchestrator.search.pool import Slot, run_slots
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher, is_external, load_teachers
from orchestrator.workspace import precheck
from tasks.errors import UserError
from tasks.kinds import TaskKind
from tasks.models import num_params
from tasks.soft_targets import PrecomputeStats, SoftTargetStore
from tasks.storage import Storage
from tasks.train import FitResult


def flat_params(spec: Workflow) -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and not prefix.endswith("params"):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(node)[:500]

    walk("", spec.model_dump(mode="json", exclude={"search"}))
    return out


def log_history(history: list[dict[str, float]], prefix: str = "") -> None:
    import mlflow

    for h in history:
        step = int(h["epoch"])
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in h.items() if k != "epoch"}, step=step)


def preflight(spec: Workflow) -> None:
    """Fail before any work on what can be checked up front: model factories that do not import."""
    task = task_for(spec)
    named = [("student.model", spec.student.model)]
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}].model" if isinstance(spec.teacher, list) else "teacher.model"
        if not is_external(t):
            named.append((where, t.model))
    for where, name in named:
        try:
            task.check_name(name)
        except UserError as exc:
            raise UserError(str(exc), where=where) from None


def run_workflow(spec: Workflow, source: str | None = None, ray_start: RayStart | None = None,
                 storage: Storage | None = None) -> dict[str, Any]:
    """data -> teachers -> soft targets -> student (or search) -> evaluation -> registry, in one MLflow run;
    `source` is the workflow file (its git commit goes into the lineage); `ray_start`: the CLI's local Ray,
    begun before this module was imported (`RayStart.begin`); `storage`: the run's storage, already checked
    by the CLI with the tracking server (`precheck`), else both are checked here."""
    import mlflow

    t_start = time.perf_counter()
    progress.TIMINGS.clear()
    # The run's warm actors start on Ray's thread as soon as Ray is up (this module's imports, which they
    # need, are done), while this thread reads the data, imports MLflow and opens its store (a fresh sqlite
    # store takes seconds): the `ray` stage is what is left to wait for after that.
    starting = ray_start.then(functools.partial(start_slots, spec)) if ray_start is not None else None
    try:
        preflight(spec)
        check_joined(spec)  # in a Ray job: what cannot work on a multi-node cluster fails here, before any work
        task = task_for(spec)
        storage = storage if storage is not None else precheck(spec)
        data = stages.load_data(spec, storage)  # a data mistake exits 2 here, before any stage starts
    except BaseException:
        if ray_start is not None:  # what started is stopped before the error goes up
            for slot in ray_start.abandon() or []:
                slot.close()
        raise
    if starting is None:  # not begun by the CLI: Ray (or the cluster's join) and the actors start now
        starting = in_background(functools.partial(start_ray, spec))
    try:
        with progress.stage("tracking", tracking.tracking_uri(spec, storage)):
            uri = tracking.connect(spec, storage, checked=True)
            prepare_model_logging()
        with progress.stage("ray", "starting or joining (begun before "
                            + ("the data stage)" if ray_start is not None else "tracking)")):
            slots = ray_started(spec, starting)
    except BaseException:
        with contextlib.suppress(Exception):  # what started is stopped before the error goes up
            for slot in starting.result():
                slot.close()
        raise
    warm = slots[0] if slots else None
    try:
        with tracking.artifact_endpoint(storage), mlflow.start_run(run_name=spec.name) as run:
            run_id = run.info.run_id
            mlflow.log_params(flat_params(spec))
            mlflow.set_tags({"kdflow.workflow": spec.name, "kdflow.data_fingerprint": data.fingerprint})
            teachers = load_teachers(spec, data, storage, warm)
            for i, t in enumerate(teachers):
                log_history(t.meta.get("history", []), prefix=f"teacher{i}_" if len(teachers) > 1 else "teacher_")
            manifest, precompute = stages.compute_soft_targets(spec, data, teachers, storage, warm)
            mlflow.log_params({"soft_targets.key": manifest["key"]})
            chosen, fit_result, search_summary = train_or_search(spec, manifest, storage, run_id, slots)
            warm_info = warm.info() if warm is not None else None
            for slot in slots:  # done with them: evaluation and registration run on the driver
                slot.close()
            slots = []
            log_history(fit_result.history)
            if fit_result.nodes:  # the Ray node of each rank: where the student's workers ran
                mlflow.set_tag("kdflow.student.nodes", ",".join(fit_result.nodes))
            finish = finisher(task)
            student, teacher, registration = finish(spec, chosen, data, fit_result, teachers, manifest, storage,
                                                    run_id, source, search_summary)
    finally:
        for slot in slots:  # a failed stage: the actors go with the run
            slot.close()
    return {
        "workflow": spec.name,
        "status": "succeeded",
        "seconds": round(time.perf_counter() - t_start, 1),
        "teacher": teacher,
        "soft_targets": soft_targets_result(manifest, precompute, storage),
        "search": search_summary,
        "student": student,
        "registry": registration,
        # the run's warm actor (pid, fits, shards, workers replaced); None when its stages ran on Ray Train
        "warm": warm_info,
        "mlflow": {"tracking_uri": uri, "experiment": spec.experiment, "run_id": run_id},
        "stages": {name: round(seconds, 1) for name, seconds in progress.TIMINGS},
    }


def start_ray(spec: Workflow) -> list[Slot]:
    """Start (or join) Ray, then the run's warm actors (`start_slots`)."""
    ensure_ray(dashboard=uses_ray_train(spec))
    return start_slots(spec)


def start_slots(spec: Workflow) -> list[Slot]:
    """The run's warm actors (`pool.run_slots`) on the Ray that is up, without waiting for them to boot."""
    import ray

    return run_slots(spec, float(ray.cluster_resources().get("CPU", LOCAL_MIN_CPUS)))


def ray_started(spec: Workflow, starting: Any) -> list[Slot]:
    """The background start's actors; if Ray's node did not come up in its fixed 30 s (its start and
    MLflow's both competing for a loaded machine's cores), Ray is started again here, with the driver idle.
    The failed attempt's processes die with the thread that started them."""
    try:
        return list(starting.result())
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
    progress.info("  [dim]Ray's node did not start in time beside MLflow's setup; starting it again[/]")
    return start_ray(spec)


def finisher(task: TaskKind) -> Any:
    """The driver-side half of the task-kind seam: the test-split report and the registration of the student
    (tasks/ cannot reach MLflow's registry or the orchestrator's stages). Classification's is below, causal
    LMs' in orchestrator/lm_run.py."""
    if task.name == "causal_lm":
        from orchestrator.lm_run import finish_lm

        return finish_lm
    return finish_classification


def finish_classification(spec: Workflow, chosen: Workflow, data: Any, fit_result: FitResult, teachers: list[Teacher],
                          manifest: dict[str, Any], storage: Storage, run_id: str, source: str | None,
                          search_summary: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    task = task_for(spec)
    with progress.stage("evaluate", "test split"):
        model = stages.student_model(chosen, manifest, fit_result)
        student, teacher = evaluate_student(task, model, fit_result, teachers, manifest, storage)
    with progress.stage("register", spec.registered_model):
        # issue-10's pickle-free pyfunc: weights plus a recipe (factory, params, the user's feature names
        # and class labels, the training split's standardization) that rebuilds the served model
        model_uri = log_student(model, **task.serving_inputs(manifest), factory=chosen.student.model,
                                params=chosen.student.params, feature_names=data.feature_names,
                                classes=data.classes)
        lineage = lineage_tags(spec, chosen, manifest, storage, teachers, search_summary)
        lineage.update(lineage_extras(chosen, source, teachers))
        registration = register(chosen, model_uri, run_id, {**student, "teacher_test_accuracy":
                                                            teacher["test_accuracy"]}, manifest, storage, lineage)
    return student, teacher, registration


def train_or_search(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_id: str,
                    slots: list[Slot] | None = None) -> tuple[Workflow, FitResult, dict[str, Any] | None]:
    """The student: the search's choice (its workflow, weights and summary), or the one the spec describes.
    `slots`: the run's warm actors (the first runs the student; a search takes them all as trial slots)."""
    warm = slots[0] if slots else None
    if spec.search is not None:
        from orchestrator.search.runner import run_search

        outcome = run_search(spec, manifest, storage, run_id, slots)
        return outcome.spec, outcome.result, outcome.summary
    with progress.stage("student", f"{spec.student.model} {spec.student.params}, {spec.train.workers} worker(s)"):
        return spec, stages.train_student(spec, manifest, storage, run_name=f"student-{run_id}", warm=warm), None


def evaluate_student(task: TaskKind, model: nn.Module, fit_result: FitResult, teachers: list[Teacher],
             manifest: dict[str, Any], storage: Storage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result's student and teacher sections, from the test split; the headline metrics go to MLflow."""
    import mlflow

    student = evaluation.evaluate_test(task, model, manifest, storage)
    teacher_acc = evaluation.teacher_test_accuracy(task, manifest, storage)
    student["retention"] = student["test_accuracy"] / teacher_acc if teacher_acc else 0.0
    student["samples_per_s"] = fit_result.samples_per_s
    student["epochs"] = len(fit_result.history)
    student["stop_reason"] = fit_result.stop_reason.value
    student["resumed_from"] = fit_result.resumed_from
    student["nodes"] = fit_result.nodes
    teacher = {"test_accuracy": teacher_acc, "num_params": sum(num_params(t.model) for t in teachers),
               "trained": any(t.trained for t in teachers), "count": len(teachers)}
    mlflow.log_metrics({"test_accuracy": student["test_accuracy"], "retention": student["retention"],
                        "teacher_test_accuracy": teacher_acc, "num_params": student["num_params"],
                        "latency_ms": student["latency_ms"], "teacher_agreement": student["teacher_agreement"]})
    progress.info(f"  teacher {teacher_acc:.4f}, student {student['test_accuracy']:.4f} "
                  f"(retention {student['retention']:.3f}, {student['num_params']} params)")
    return student, teacher


def lineage_tags(spec: Workflow, chosen: Workflow, manifest: dict[str, Any], storage: Storage,
                 teachers: list[Teacher], search_summary: dict[str, Any] | None) -> dict[str, str]:
    """Where the registered student came from: workflow, soft targets, data, teachers, student, search trial."""
    lineage = {"kdflow.workflow": spec.name, "kdflow.soft_targets.key": manifest["key"],
               "kdflow.soft_targets.uri": SoftTargetStore(storage).uri(manifest["key"]),
               "kdflow.data_fingerprint": manifest["data_fingerprint"],
               "kdflow.teachers": ",".join(t.digest[:16] for t in teachers),
               "kdflow.student": f"{chosen.student.model} {chosen.student.params}",
               "kdflow.distill": f"{chosen.distill.loss} T={chosen.distill.temperature} alpha={chosen.distill.alpha}"}
    if search_summary:
        lineage["kdflow.search.study"] = search_summary["study"]
        lineage["kdflow.search.trial"] = str(search_summary["best_trial"])
    return lineage


def soft_targets_result(manifest: dict[str, Any], precompute: PrecomputeStats, storage: Storage) -> dict[str, Any]:
    """The result's soft_targets section: what is stored (manifest) and what this run did (precompute)."""
    return {"uri": SoftTargetStore(storage).uri(manifest["key"]), "cache_key": manifest["key"],
            "reused": precompute.reused, "computed_shards": precompute.computed_shards,
            "teacher_forward_rows": precompute.forward_rows, "rows": manifest["rows"], "bytes": manifest["bytes"],
            "format": manifest["format"], "dtype": manifest["dtype"],
            **({"top_k": manifest["top_k"], "seq_len": manifest["seq_len"], "tokenizer_hash": manifest["tokenizer_hash"],
                "bytes_per_token": manifest["bytes"] / max(1, manifest["rows"] * manifest["seq_len"])}
               if manifest.get("seq_len") else {})}
