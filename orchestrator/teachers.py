"""Teachers: loaded from outside kdflow (checkpoint, factory, models:/name@alias) or trained once and cached.

A teacher trained here is kept under teachers/<key>/model.pt; the key hashes its spec, the labeled data
and the seed, so a rerun (or a search) never trains it twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator import progress
from orchestrator.configs import data_meta, task_for, teacher_fit_config
from orchestrator.spec import TeacherSpec, Workflow
from orchestrator.workspace import digest
from tasks.data import Dataset
from tasks.errors import UserError
from tasks.layout import TEACHERS, teacher_path
from tasks.models import Standardized, build_model, weights_digest
from tasks.storage import Storage


def is_external(t: TeacherSpec) -> bool:
    """Loaded from outside kdflow (a checkpoint, a registry URI, a model file or directory) rather than trained here."""
    return (bool(t.checkpoint) or t.model.startswith("models:/") or t.model.endswith((".pt", ".pth"))
            or os.path.isdir(t.model))


def build_for(spec: Workflow, t: TeacherSpec, data: Dataset, where: str) -> nn.Module:
    """The teacher's model as the task kind builds it (a bad name or params exits 2 naming the teacher key)."""
    task = task_for(spec)
    try:
        return task.build_model(t.model, t.params, task.dims(data_meta(data)))
    except UserError as exc:
        raise exc.under(where) from None


@dataclass
class Teacher:
    model: nn.Module
    origin: str
    digest: str
    trained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _load_external(spec: Workflow, t: TeacherSpec, where: str, data: Dataset) -> nn.Module:
    if os.path.isdir(t.model) or (spec.task == "causal_lm" and t.model.startswith("models:/")):
        return build_for(spec, t, data, where)  # a causal LM's directory or registered model: the task kind reads it
    if t.model.startswith("models:/"):
        from tasks.served import load_module

        try:
            model = load_module(t.model)  # a kdflow student: rebuilt from safetensors, nothing unpickled
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {t.model}: {str(exc).splitlines()[0]}", where=f"{where}.model") from None
        return Standardized(model, data.mean, data.std, inputs="standardized")
    path = t.checkpoint or t.model
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}", where=f"{where}.{'checkpoint' if t.checkpoint else 'model'}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling a user's file can raise anything
        raise UserError(f"cannot load checkpoint {path}: {exc}", where=where) from None
    if isinstance(obj, nn.Module):
        return Standardized(obj, data.mean, data.std, inputs="standardized")
    if isinstance(obj, dict):  # a state_dict for the family named in `model`
        model = build_model(t.model, t.params, data.num_features, data.num_classes)
        try:
            model.load_state_dict(obj.get("model", obj))
        except RuntimeError as exc:
            raise UserError(f"checkpoint does not fit {t.model} {t.params}: {str(exc).splitlines()[0]}",
                            where=f"{where}.checkpoint") from None
        return Standardized(model, data.mean, data.std, inputs="standardized")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model or state_dict", where=where)


def load_teachers(spec: Workflow, data: Dataset, storage: Storage, warm: Any = None) -> list[Teacher]:
    """Each teacher is loaded (checkpoint, factory, registry) or trained once and cached by content; trained
    on `warm` (the run's warm actor, `search.pool.Slot`) when single-worker on CPUs, else by Ray Train."""
    from orchestrator.search.pool import fit_on

    out = []
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}]" if isinstance(spec.teacher, list) else "teacher"
        with progress.stage(f"teacher {i}" if len(spec.teachers) > 1 else "teacher", t.model):
            if is_external(t):
                model = _load_external(spec, t, where, data)
                out.append(Teacher(model, t.checkpoint or t.model, weights_digest(model)))
                continue
            build_for(spec, t, data, where)  # fail fast on bad params
            key = digest({"model": t.model, "params": t.params, "train": t.train.model_dump(),
                          "data": data.labeled_fingerprint, "seed": spec.seed})
            path = teacher_path(storage, key)
            if storage.exists(path):
                saved = storage.read_torch(path)
                progress.info(f"  reusing the trained teacher {storage.uri(TEACHERS, key)}")
                trained = False
            else:
                result = fit_on(warm, teacher_fit_config(spec, t, data), storage, f"teacher-{key}")
                saved = {"state_dict": result.state_dict, "history": result.history}
                storage.write_torch(path, saved)
                trained = True
            model = build_for(spec, t, data, where)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            out.append(Teacher(model, storage.uri(TEACHERS, key), weights_digest(model), trained,
                               {"history": saved.get("history", [])}))
    return out


