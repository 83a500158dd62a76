"""task classification: rows of features -> one class each; KD on the class distribution mixed with
cross-entropy on the labels.

    spec.py       its workflow sections (data: source, features, label, transfer)
    data.py       built-ins and Parquet tables read by piece, split by hash, standardized (FeatureTable)
    models.py     mlp, cnn1d, transformer, user factories; Standardized
    teachers.py   teachers from outside kdflow: registered models, whole-model files, state_dicts
    targets.py    teacher logits at T=1 as stored; a worker's rows placed for its batches
    objective.py  KD + CE over labeled rows; accuracy, agreement, cross-entropy
    report.py     test accuracy, retention, latency; the teacher's accuracy from its stored logits
    serving.py    safetensors + a JSON recipe; the pyfunc (pyfunc.py) takes the user's raw feature columns
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.errors import UserError
from tasks.kinds.base import Champion, Finished, Report, Share, TaskKind
from tasks.kinds.classification.spec import SPEC

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tasks.dataset import Dataset
    from tasks.sections import DataSpec, ModelSpec, TeacherSpec
    from tasks.storage import Storage
    from tasks.store.shards import TargetBatch
    from tasks.train.config import LossConfig

EPOCH_METRICS = ("val_accuracy", "val_loss", "val_agreement", "train_loss", "train_kd", "train_ce", "samples_per_s")


class Classification(TaskKind):
    """Features [N, F] -> logits [N, C]. Transfer rows carry label -1: the KD term sees them, CE does not."""

    name = "classification"
    spec = SPEC
    best_by = ("val_accuracy", True)
    epoch_metrics = EPOCH_METRICS
    gate_metrics = ("test_accuracy", "retention", "latency_ms", "teacher_agreement", "teacher_test_accuracy")
    headline = (("test_accuracy", "accuracy"), ("retention", "retention"), ("num_params", "params"),
                ("latency_ms", "latency ms"))
    champion = Champion(metric="accuracy", tag="test_accuracy")

    def unknown_param(self, model: str, param: str) -> str | None:
        import inspect

        from tasks.kinds.classification.models import MODELS

        if model not in MODELS:
            return None  # a user factory: checked when it is built
        params = inspect.signature(MODELS[model]).parameters
        if param in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        known = [p for p in params if p not in ("num_features", "num_classes")]
        return f"{model} has no parameter {param!r} (it takes {', '.join(known)})"

    def check_workflow(self, workflow: Any) -> None:
        if workflow.soft_targets.format == "sampled":
            raise ValueError("soft_targets.format: sampled is stored per token, for causal_lm; a classifier's "
                             "targets are logits or topk")

    # ------------------------------------------------ data

    def load_data(self, data: DataSpec, *, seed: int, storage: Storage | None) -> Dataset:
        from tasks.kinds.classification.data import load_dataset

        d: Any = data
        return load_dataset(d.source, features=d.features, label=d.label, val=d.split.val, test=d.split.test,
                            transfer=d.transfer, seed=seed, limit=d.limit, storage=storage,
                            splits=d.splits)

    def describe(self, data: Any) -> str:
        return f"{data.num_features} features, {data.num_classes} classes"

    def manifest_meta(self, data: Any) -> dict[str, Any]:
        return {"num_classes": data.num_classes, "num_features": data.num_features, "mean": data.mean.tolist(),
                "std": data.std.tolist(), "transfer_rows": data.counts.get("transfer", 0)}

    def dims(self, meta: Mapping[str, Any]) -> dict[str, int]:
        return {"num_features": int(meta["num_features"]), "num_classes": int(meta["num_classes"])}

    def target_width(self, dims: Mapping[str, Any]) -> int:
        return int(dims["num_classes"])

    # ------------------------------------------------ models

    def check_name(self, name: str) -> None:
        from tasks.kinds.classification.models import resolve_factory

        resolve_factory(name)

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
        from tasks.kinds.classification.models import build_model

        return build_model(name, dict(params), dims["num_features"], dims["num_classes"])

    def external_teacher(self, teacher: TeacherSpec) -> bool:
        t: Any = teacher
        return bool(t.checkpoint) or t.model.startswith("models:/") or t.model.endswith((".pt", ".pth")) \
            or os.path.isdir(t.model)

    def load_teacher(self, teacher: TeacherSpec, data: Dataset) -> nn.Module:
        from tasks.kinds.classification.teachers import load_teacher

        return load_teacher(teacher, data)

    # ------------------------------------------------ targets

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        from tasks.models import teacher_forward

        return teacher_forward(teachers, x, rule, batch=4096)

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, Any]) -> torch.Tensor:
        from tasks.kinds.classification.targets import teacher_logits

        return teacher_logits(targets, dims["num_classes"])

    def place(self, rows: TargetBatch, dims: Mapping[str, Any], device: torch.device) -> Share:
        from tasks.kinds.classification.targets import place_share

        return place_share(rows, dims["num_classes"], device)

    # ------------------------------------------------ objective

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: Any, loss: LossConfig | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        from tasks.kinds.classification.objective import objective

        return objective(logits, y, teacher, loss)

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, Any],
                    device: torch.device) -> torch.Tensor:
        from tasks.kinds.classification.objective import evaluate_counts

        return evaluate_counts(model, rows, dims["num_classes"], device)

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
        from tasks.kinds.classification.objective import metrics_from_counts

        return metrics_from_counts(counts, with_teacher)

    def epoch_summary(self, metrics: Mapping[str, float], dims: Mapping[str, Any]) -> str:
        from tasks.kinds.classification.objective import epoch_summary

        return epoch_summary(metrics)

    # ------------------------------------------------ report

    def report(self, done: Finished) -> Report:
        from tasks.kinds.classification.report import report

        return report(self, done)

    def summary_table(self, teacher: Mapping[str, Any], student: Mapping[str, Any]
                      ) -> tuple[list[str], list[list[str]]]:
        from tasks.kinds.classification.report import summary_table

        return summary_table(teacher, student)

    # ------------------------------------------------ serving

    def log_model(self, model: nn.Module, student: ModelSpec, data: Any, manifest: Mapping[str, Any],
                  pip_requirements: list[str]) -> str:
        import numpy as np

        from tasks.kinds.classification.serving import log_student

        return log_student(model, np.asarray(manifest["mean"], np.float32), np.asarray(manifest["std"], np.float32),
                           factory=student.model, params=student.params, feature_names=data.feature_names,
                           classes=data.classes, pip_requirements=pip_requirements)

    def load_registered(self, uri: str, manifest: Mapping[str, Any]) -> nn.Module | None:
        """The registered student (which takes raw features) made to take the stored, standardized rows."""
        import torch

        from tasks.kinds.classification.models import Standardized
        from tasks.kinds.classification.serving import load_module

        try:
            served = load_module(uri)
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {uri}: {str(exc).splitlines()[0]}") from None
        if "mean" not in manifest or "std" not in manifest:
            return None
        return Standardized(served, torch.tensor(manifest["mean"]), torch.tensor(manifest["std"]),
                            inputs="standardized")
