"""The one place a fit's configuration is made from the workflow: teacher and student `FitConfig`s.

Every value comes from the `Workflow` (whose defaults are the only ones); tasks/train/loop.py reads the
frozen result and adds nothing to it.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.spec import OptimizerSpec, TrainSpec, Workflow
from tasks.dataset import Dataset
from tasks.layout import online_teacher_path
from tasks.sections import DistillSpec, TeacherSpec
from tasks.storage import Storage
from tasks.train.config import EarlyStopping, FitConfig, LossConfig, OnlineTeacher, OptimizerConfig, Resources
from tasks.train.sources import ArraySource, RowSource, ShardSource, SourceRows


def _optimizer(o: OptimizerSpec) -> OptimizerConfig:
    return OptimizerConfig(name=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                           schedule=o.schedule, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip)


def machine_cores() -> int:
    """The cores this process may run on (what plain PyTorch sizes its thread pool by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads(train: TrainSpec, concurrent: int = 1) -> int | None:
    """Torch threads per worker: on a local run with `train.cpus_per_worker` not set, the machine's cores
    shared by the workers that run at once (`concurrent` fits of `train.workers` each); None (the worker's
    CPUs) when cpus_per_worker is set or on a cluster, where a node's cores are not this machine's."""
    if "cpus_per_worker" in train.model_fields_set or os.environ.get("RAY_ADDRESS"):
        return None
    return max(1, machine_cores() // (train.workers * max(1, concurrent)))


def _resources(train: TrainSpec, concurrent: int = 1) -> Resources:
    return Resources(workers=train.workers, use_gpu=train.use_gpu, cpus_per_worker=train.cpus_per_worker,
                     gpus_per_worker=train.gpus_per_worker, max_failures=train.max_failures,
                     placement=train.placement, torch_threads=torch_threads(train, concurrent))


def loss_config(distill: DistillSpec) -> LossConfig:
    return LossConfig(kind=distill.loss, temperature=distill.temperature, alpha=distill.alpha, beta=distill.beta)


def workers_read_source(data: Dataset) -> bool:
    """Whether Ray's workers read a Parquet source's rows themselves (`Dataset.source_rows`) rather than take the
    driver's arrays: always from S3; from a local path only while every node of the cluster is on this machine
    (a path on the driver's disk need not exist on another machine, nor a `kdflow submit` job's working folder
    at the same place). Needs Ray up."""
    if not data.source_rows:
        return False
    if next(iter(data.source_rows.values())).reader.url.startswith("s3://"):
        return True
    import ray

    return machines(ray.nodes()) <= 1


def machines(nodes: list[dict[str, Any]]) -> int:
    """The machines under Ray's live nodes (`ray.nodes()`): nodes on one host share its address and its disk."""
    return len({n["NodeManagerAddress"] for n in nodes if n.get("Alive")})


def rows_for_teacher(data: Dataset) -> tuple[RowSource, RowSource | None]:
    """The teacher's train and val rows (val None when empty): a Parquet source's splits read from its pieces by
    the training worker (`SourceRows`), so the driver puts nothing into Ray's object store, when the workers can
    open the source (`workers_read_source`); else the arrays put there (`ArraySource`). The teacher sees only
    the labeled train split, so transfer rows change nothing."""
    if workers_read_source(data):
        train = SourceRows(data.source_rows["train"])
        return train, (SourceRows(data.source_rows["val"]) if data.rows("val") else None)
    import ray

    val = ArraySource(ray.put(data.x["val"]), ray.put(data.y["val"])) if data.rows("val") else None
    return ArraySource(ray.put(data.x["train"]), ray.put(data.y["train"])), val


def teacher_fit_config(spec: Workflow, t: TeacherSpec, data: Dataset) -> FitConfig:
    """A teacher trained here: hard labels only, AdamW with teacher.train's values, the train stage's resources."""
    kind = spec.kind
    # teacher.train has no optimizer section: AdamW, with momentum (unused by AdamW) from the spec's default
    optimizer = _optimizer(OptimizerSpec(name="adamw", lr=t.train.lr, weight_decay=t.train.weight_decay,
                                         schedule=t.train.schedule, warmup_steps=t.train.warmup_steps,
                                         grad_clip=t.train.grad_clip))
    train, val = rows_for_teacher(data)
    return FitConfig(
        log_prefix="teacher", kind=kind, model=t.model, params=t.params,
        dims=kind.dims(kind.manifest_meta(data)), seed=spec.seed,
        epochs=t.train.epochs, batch_size=t.train.batch_size, optimizer=optimizer, precision=spec.train.precision,
        loss=None, data=train, val=val,
        early_stopping=None, checkpoint_every=spec.train.checkpoint_every,
        checkpoint_interval_s=spec.train.checkpoint_interval_s, resources=_resources(spec.train), epoch_hook=None,
        hold_share_bytes=int(spec.train.hold_share_mb * 2**20), online_teacher=None, after_epochs=None)


def student_fit_config(spec: Workflow, manifest: dict[str, Any], storage: Storage,
                       epoch_hook: Any, concurrent: int = 1) -> FitConfig:
    """The student: distillation from the stored soft targets with the train and distill sections;
    `concurrent` fits like it run at once (a search's trials), sharing the machine's cores."""
    kind = spec.kind
    es = spec.train.early_stopping
    return FitConfig(
        log_prefix="student", kind=kind, model=spec.student.model, params=spec.student.params,
        dims=kind.dims(manifest), seed=spec.seed, epochs=spec.train.epochs, batch_size=spec.train.batch_size,
        optimizer=_optimizer(spec.train.optimizer), precision=spec.train.precision, loss=loss_config(spec.distill),
        data=ShardSource(storage, manifest, "train"),
        val=ShardSource(storage, manifest, "val") if manifest["splits"]["val"]["rows"] else None,
        early_stopping=EarlyStopping(es.metric, es.patience, es.direction == "max") if es else None,
        checkpoint_every=spec.train.checkpoint_every, checkpoint_interval_s=spec.train.checkpoint_interval_s,
        resources=_resources(spec.train, concurrent), epoch_hook=epoch_hook,
        hold_share_bytes=int(spec.train.hold_share_mb * 2**20), online_teacher=online_teacher(spec, manifest, storage),
        after_epochs=kind.after_epochs(spec, manifest))


def online_teacher(spec: Workflow, manifest: dict[str, Any], storage: Storage) -> OnlineTeacher | None:
    """The entry's teachers for the student's workers to run in the loop, when the kind says so
    (`teacher_in_loop`); they were put on storage by the teacher stage (orchestrator/teachers.py)."""
    if not spec.kind.teacher_in_loop(spec):
        return None
    paths = [online_teacher_path(storage, t["digest"]) for t in manifest["teachers"]]
    return OnlineTeacher(storage, paths, manifest["ensemble"])
