"""Teachers: loaded from outside kdflow (the kind says what that is: a checkpoint, a registered model, a model
directory) or trained once and cached.

A teacher trained here is kept under teachers/<key>/model.pt; the key hashes its spec, the labeled data
and the seed, so a rerun (or a search) never trains it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from orchestrator import progress
from orchestrator.configs import teacher_fit_config
from orchestrator.fitting import Slot, run_fit
from orchestrator.spec import Workflow
from orchestrator.workspace import digest
from tasks.dataset import Dataset
from tasks.errors import UserError
from tasks.layout import TEACHERS, online_teacher_path, teacher_path
from tasks.models import weights_digest
from tasks.sections import TeacherSpec
from tasks.storage import Storage


@dataclass
class Teacher:
    model: nn.Module
    origin: str
    digest: str
    trained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def build_for(spec: Workflow, t: TeacherSpec, data: Dataset, where: str) -> nn.Module:
    """The teacher's model as the kind builds it (a bad name or params exits 2 naming the teacher key)."""
    kind = spec.kind
    try:
        return kind.build_model(t.model, t.params, kind.dims(kind.manifest_meta(data)))
    except UserError as exc:
        raise exc.under(where) from None


def _external(spec: Workflow, t: TeacherSpec, data: Dataset, where: str) -> Teacher:
    try:
        model = spec.kind.load_teacher(t, data)
    except UserError as exc:
        raise exc.under(where) from None
    return Teacher(model, getattr(t, "checkpoint", None) or t.model, weights_digest(model))


def _trained(spec: Workflow, t: TeacherSpec, data: Dataset, storage: Storage, warm: Slot | None, where: str) -> Teacher:
    build_for(spec, t, data, where)  # fail fast on bad params
    key = digest({"model": t.model, "params": t.params, "train": t.train.model_dump(),
                  "data": data.labeled_fingerprint, "seed": spec.seed})
    path = teacher_path(storage, key)
    if storage.exists(path):
        saved = storage.read_torch(path)
        progress.info(f"  reusing the trained teacher {storage.uri(TEACHERS, key)}")
        trained = False
    else:
        result = run_fit(teacher_fit_config(spec, t, data), storage, f"teacher-{key}", slot=warm).result
        saved = {"state_dict": result.state_dict, "history": result.history}
        storage.write_torch(path, saved)
        trained = True
    model = build_for(spec, t, data, where)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return Teacher(model, storage.uri(TEACHERS, key), weights_digest(model), trained,
                   {"history": saved.get("history", [])})


def load_teachers(spec: Workflow, data: Dataset, storage: Storage, warm: Slot | None = None) -> list[Teacher]:
    """Each teacher is loaded from outside kdflow or trained once and cached by content; trained on `warm`
    (the run's warm actor) when single-worker on CPUs, else by Ray Train (`fitting.run_fit` decides)."""
    out = []
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}]" if isinstance(spec.teacher, list) else "teacher"
        with progress.stage(f"teacher {i}" if len(spec.teachers) > 1 else "teacher", t.model):
            if spec.kind.external_teacher(t):
                out.append(_external(spec, t, data, where))
            else:
                out.append(_trained(spec, t, data, storage, warm, where))
            if spec.kind.teacher_in_loop(spec):
                for_workers(spec, t, out[-1], storage)
    return out


def for_workers(spec: Workflow, t: TeacherSpec, teacher: Teacher, storage: Storage) -> None:
    """Put the teacher where an online student's workers rebuild it (`tasks.train.loop.online_teachers`): the
    kind's recipe and the weights, keyed by their digest, written once."""
    path = online_teacher_path(storage, teacher.digest)
    if not storage.exists(path):
        model, params = spec.kind.teacher_recipe(t, teacher.model)
        storage.write_torch(path, {"model": model, "params": params, "state_dict": teacher.model.state_dict()})
