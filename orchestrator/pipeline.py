"""Runs a workflow's stages in order inside one MLflow run and builds the result object (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from orchestrator import lineage, progress, stages, tracking
from orchestrator.cluster import check_joined
from orchestrator.finish import Chosen, finish
from orchestrator.fitting import Slot, run_slots
from orchestrator.registry import prepare_model_logging, teacher_origins
from orchestrator.runtime import LOCAL_MIN_CPUS, RayStart, ensure_ray, in_background, uses_ray_train
from orchestrator.spec import Workflow
from orchestrator.teachers import load_teachers
from orchestrator.tracking import log_history
from orchestrator.workspace import precheck
from tasks.dataset import Dataset
from tasks.errors import UserError
from tasks.storage import Storage
from tasks.store.precompute import PrecomputeStats
from tasks.store.store import SoftTargetStore


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


def preflight(spec: Workflow) -> None:
    """Fail before any work on what can be checked up front: model names the kind cannot build."""
    kind = spec.kind
    named = [("student.model", spec.student.model)]
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}].model" if isinstance(spec.teacher, list) else "teacher.model"
        if not kind.external_teacher(t):
            named.append((where, t.model))
    for where, name in named:
        try:
            kind.check_name(name)
        except UserError as exc:
            raise UserError(str(exc), where=where) from None


@dataclass
class Started:
    """What a run has before its MLflow run opens: the data, the storage, the tracking URI, its warm actors."""

    data: Dataset
    storage: Storage
    uri: str
    slots: list[Slot]


def run_workflow(spec: Workflow, source: str | None = None, ray_start: RayStart | None = None,
                 storage: Storage | None = None) -> dict[str, Any]:
    """data -> teachers -> soft targets -> student (or search) -> report -> registry, in one MLflow run;
    `source` is the workflow file (its git commit goes into the lineage); `ray_start`: the CLI's local Ray,
    begun before this module was imported (`RayStart.begin`); `storage`: the run's storage, already checked
    by the CLI with the tracking server (`precheck`), else both are checked here."""
    t_start = time.perf_counter()
    progress.TIMINGS.clear()
    started = start(spec, ray_start, storage)
    try:
        result = run_stages(spec, started, source)
    finally:
        for slot in started.slots:  # done (or a failed stage): the actors go with the run
            slot.close()
    return {"workflow": spec.name, "task": spec.task, "status": "succeeded",
            "seconds": round(time.perf_counter() - t_start, 1), **result,
            "stages": {name: round(seconds, 1) for name, seconds in progress.TIMINGS}}


def start(spec: Workflow, ray_start: RayStart | None, storage: Storage | None) -> Started:
    """The data read and checked, MLflow connected and Ray up with the run's warm actors. The actors start on
    Ray's thread as soon as Ray is up (this module's imports, which they need, are done), while this thread
    reads the data, imports MLflow and opens its store (a fresh sqlite store takes seconds): the `ray` stage
    is what is left to wait for after that. A mistake found on the way stops what started, then goes up."""
    starting = ray_start.then(functools.partial(start_slots, spec)) if ray_start is not None else None
    try:
        preflight(spec)
        check_joined(spec)  # in a Ray job: what cannot work on a multi-node cluster fails here, before any work
        storage = storage if storage is not None else precheck(spec)
        data = stages.load_data(spec, storage)  # a data mistake exits 2 here, before any stage starts
    except BaseException:
        if ray_start is not None:
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
        with contextlib.suppress(Exception):
            for slot in starting.result():
                slot.close()
        raise
    return Started(data, storage, uri, slots)


def run_stages(spec: Workflow, started: Started, source: str | None) -> dict[str, Any]:
    """The stages inside the run's MLflow run; the result's sections."""
    import mlflow

    data, storage, slots = started.data, started.storage, started.slots
    warm = slots[0] if slots else None
    with tracking.artifact_endpoint(storage), mlflow.start_run(run_name=spec.name) as run:
        run_id = run.info.run_id
        mlflow.log_params(flat_params(spec))
        mlflow.set_tags({"kdflow.workflow": spec.name, "kdflow.task": spec.task,
                         "kdflow.data_fingerprint": data.fingerprint})
        lineage.log_data_inputs(data, spec.data.source)
        teachers = load_teachers(spec, data, storage, warm)
        for i, t in enumerate(teachers):
            log_history(t.meta.get("history", []), prefix=f"teacher{i}_" if len(teachers) > 1 else "teacher_")
        manifest, precompute = stages.compute_soft_targets(spec, data, teachers, storage, warm)
        mlflow.log_params({"soft_targets.key": manifest["key"]})
        lineage.log_store_input(manifest, SoftTargetStore(storage).uri(manifest["key"]),
                                teacher_origins(teachers))
        chosen = train_or_search(spec, manifest, storage, run_id, slots)
        for slot in slots[1:]:  # a search's other slots are done; the run's own actor may train variants
            slot.close()
        log_history(chosen.fit.history)
        after = tracking.log_after_epochs(chosen.fit.after, functools.partial(spec.kind.render_ids, data))
        if chosen.fit.nodes:  # the Ray node of each rank: where the student's workers ran
            mlflow.set_tag("kdflow.student.nodes", ",".join(chosen.fit.nodes))
        student, teacher, registration = finish(spec, chosen, data, teachers, manifest, storage, run_id, source, warm)
        warm_info = warm.info() if warm is not None else None
    return {"teacher": teacher, "soft_targets": soft_targets_result(spec, manifest, precompute, storage),
            "search": chosen.search, "student": student, "registry": registration,
            **({"after_epochs": after} if after else {}),
            # the run's warm actor (pid, fits, shards, workers replaced); None when its stages ran on Ray Train
            "warm": warm_info, "mlflow": {"tracking_uri": started.uri, "experiment": spec.experiment, "run_id": run_id}}


def start_ray(spec: Workflow) -> list[Slot]:
    """Start (or join) Ray, then the run's warm actors (`start_slots`)."""
    ensure_ray(dashboard=uses_ray_train(spec.train))
    return start_slots(spec)


def start_slots(spec: Workflow) -> list[Slot]:
    """The run's warm actors (`fitting.run_slots`) on the Ray that is up, without waiting for them to boot."""
    import ray

    return run_slots(spec.train, spec.search, float(ray.cluster_resources().get("CPU", LOCAL_MIN_CPUS)))


def ray_started(spec: Workflow, starting: Future[Any]) -> list[Slot]:
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


def train_or_search(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_id: str,
                    slots: list[Slot]) -> Chosen:
    """The student: the search's choice (its workflow, weights and summary), or the one the spec describes.
    `slots`: the run's warm actors (the first runs the student; a search takes them all as trial slots)."""
    if spec.search is not None:
        from orchestrator.search.runner import run_search

        outcome = run_search(spec, manifest, storage, run_id, slots)
        return Chosen(outcome.spec, outcome.result, outcome.summary)
    with progress.stage("student", f"{spec.student.model} {spec.student.params}, {spec.train.workers} worker(s)"):
        fit = stages.train_student(spec, manifest, storage, run_name=f"student-{run_id}",
                                   warm=slots[0] if slots else None)
    return Chosen(spec, fit, None)


def soft_targets_result(spec: Workflow, manifest: dict[str, Any], precompute: PrecomputeStats,
                        storage: Storage) -> dict[str, Any]:
    """The result's soft_targets section: what is stored (manifest) and what this run did (precompute)."""
    return {"uri": SoftTargetStore(storage).uri(manifest["key"]), "cache_key": manifest["key"],
            "reused": precompute.reused, "computed_shards": precompute.computed_shards,
            "teacher_forward_rows": precompute.forward_rows, "rows": manifest["rows"], "bytes": manifest["bytes"],
            "format": manifest["format"], "dtype": manifest["dtype"],
            **({"top_k": manifest["top_k"]} if manifest["format"] == "topk" else {}),
            **({"samples": manifest["samples"]} if manifest["format"] == "sampled" else {}),
            **spec.kind.targets_summary(manifest),
            # the teachers ran in the student's training loop; the entry's stored targets served val and test
            **({"teacher_in_loop": True} if spec.kind.teacher_in_loop(spec) else {})}
