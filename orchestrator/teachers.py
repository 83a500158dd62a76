"""Teachers: loaded from outside kdflow (checkpoint, factory, models:/name@alias) or trained once and cached.

A teacher trained here is kept under teachers/<key>/model.pt; the key hashes its spec, the labeled data
and the seed, so a rerun (or a search) never trains it twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator import progress
from orchestrator.spec import TeacherSpec, Workflow
from orchestrator.workspace import digest
from tasks.data import Dataset
from tasks.errors import UserError
from tasks.layout import TEACHERS, teacher_path
from tasks.models import build_model, weights_digest
from tasks.storage import Storage
from tasks.train import ArraySource, fit


class RawInput(nn.Module):
    """A teacher trained outside kdflow sees the user's raw features, not kdflow's standardized ones."""

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.std + self.mean)


@dataclass
class Teacher:
    model: nn.Module
    origin: str
    digest: str
    trained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _load_external(t: TeacherSpec, where: str, data: Dataset) -> nn.Module:
    if t.model.startswith("models:/"):
        import mlflow

        try:
            model = mlflow.pytorch.load_model(t.model, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {t.model}: {str(exc).splitlines()[0]}", where=f"{where}.model") from None
        return RawInput(model, data.mean, data.std)
    path = t.checkpoint or t.model
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}", where=f"{where}.{'checkpoint' if t.checkpoint else 'model'}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling a user's file can raise anything
        raise UserError(f"cannot load checkpoint {path}: {exc}", where=where) from None
    if isinstance(obj, nn.Module):
        return RawInput(obj, data.mean, data.std)
    if isinstance(obj, dict):  # a state_dict for the family named in `model`
        model = build_model(t.model, t.params, data.num_features, data.num_classes)
        try:
            model.load_state_dict(obj.get("model", obj))
        except RuntimeError as exc:
            raise UserError(f"checkpoint does not fit {t.model} {t.params}: {str(exc).splitlines()[0]}",
                            where=f"{where}.checkpoint") from None
        return RawInput(model, data.mean, data.std)
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model or state_dict", where=where)


def _teacher_train_config(spec: Workflow, t: TeacherSpec, data: Dataset, storage: Storage) -> dict[str, Any]:
    import ray

    train_x = ray.put(data.x["train"])
    train_y = ray.put(data.y["train"])
    return {
        "label": "teacher", "model": t.model, "params": t.params, "num_features": data.num_features,
        "num_classes": data.num_classes, "seed": spec.seed, "epochs": t.train.epochs,
        "batch_size": t.train.batch_size, "loss": None,
        "optimizer": {"name": "adamw", "lr": t.train.lr, "weight_decay": t.train.weight_decay},
        "data": ArraySource(train_x, train_y),
        "val": ArraySource(ray.put(data.x["val"]), ray.put(data.y["val"])) if data.rows("val") else None,
        "early_stopping": None, "precision": spec.train.precision,
        "checkpoint_every": spec.train.checkpoint_every, "checkpoint_interval_s": spec.train.checkpoint_interval_s,
    }


def load_teachers(spec: Workflow, data: Dataset, storage: Storage) -> list[Teacher]:
    """Each teacher is loaded (checkpoint, factory, registry) or trained once and cached by content."""
    out = []
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}]" if isinstance(spec.teacher, list) else "teacher"
        external = t.checkpoint or t.model.startswith("models:/") or t.model.endswith((".pt", ".pth"))
        with progress.stage(f"teacher {i}" if len(spec.teachers) > 1 else "teacher", t.model):
            if external:
                model = _load_external(t, where, data)
                out.append(Teacher(model, t.checkpoint or t.model, weights_digest(model)))
                continue
            build_model(t.model, t.params, data.num_features, data.num_classes)  # fail fast on bad params
            key = digest({"model": t.model, "params": t.params, "train": t.train.model_dump(),
                          "data": data.labeled_fingerprint, "seed": spec.seed})
            path = teacher_path(storage, key)
            if storage.exists(path):
                saved = storage.read_torch(path)
                progress.info(f"  reusing the trained teacher {storage.uri(TEACHERS, key)}")
                trained = False
            else:
                result = fit(_teacher_train_config(spec, t, data, storage), workers=spec.train.workers,
                             use_gpu=spec.train.use_gpu, cpus_per_worker=spec.train.cpus_per_worker,
                             gpus_per_worker=spec.train.gpus_per_worker, storage=storage,
                             run_name=f"teacher-{key}", max_failures=spec.train.max_failures)
                saved = {"state_dict": result.state_dict, "history": result.history}
                storage.write_torch(path, saved)
                trained = True
            model = build_model(t.model, t.params, data.num_features, data.num_classes)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            out.append(Teacher(model, storage.uri(TEACHERS, key), weights_digest(model), trained,
                               {"history": saved.get("history", [])}))
    return out


