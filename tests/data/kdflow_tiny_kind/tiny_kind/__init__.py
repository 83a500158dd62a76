"""task regression: rows of features -> one real value; the student learns the teacher's predictions.

A kind of task written outside kdflow against its public seam (`tasks.kinds.base.TaskKind`) and registered
through the `kdflow.kinds` entry point: its own workflow sections, data, model, stored targets (the
teacher's prediction per row), objective, metrics, report and served model. Small on purpose: what it does
not need (top-k targets, external teachers, a champion comparison) it leaves to the base class's answers.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from tasks.dataset import Dataset
from tasks.errors import UserError
from tasks.kinds.base import Finished, KindSpec, Report, TaskKind
from tasks.sections import DataSpec, DistillSpec, ModelSpec, SoftTargetSpec, TeacherSpec

FAMILY = "mlp"


class RegressionData(DataSpec):
    source: str = Field("sklearn:diabetes", description="sklearn:diabetes (442 rows, 10 features)")


class RegressionModel(ModelSpec):
    model: str = FAMILY


class RegressionTeacher(TeacherSpec):
    model: str = FAMILY


class RegressionDistill(DistillSpec):
    loss: str = "mse"

    @classmethod
    def check_loss(cls, name: str) -> None:
        if name != "mse":
            raise ValueError(f"{name!r}: regression distils with mse only")


@dataclass(kw_only=True)
class Table(Dataset):
    """Standardized features [N, F] and standardized targets [N] (float32)."""

    num_features: int
    y_mean: float
    y_std: float


def load(data: RegressionData, seed: int) -> Table:
    import numpy as np

    if data.source != "sklearn:diabetes":
        raise UserError(f"unknown source {data.source!r}; regression knows sklearn:diabetes", where="source")
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = d.data.astype(np.float32), d.target.astype(np.float32)
    if data.limit:
        x, y = x[:data.limit], y[:data.limit]
    order = np.random.default_rng(seed).permutation(len(y))
    n_test, n_val = max(1, round(len(y) * data.split.test)), round(len(y) * data.split.val)
    idx = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    mean, std = x[idx["train"]].mean(0), x[idx["train"]].std(0) + 1e-6
    y_mean, y_std = float(y[idx["train"]].mean()), float(y[idx["train"]].std())
    xs = {k: ((x[i] - mean) / std).astype(np.float32) for k, i in idx.items()}
    ys = {k: ((y[i] - y_mean) / y_std).astype(np.float32) for k, i in idx.items()}
    h = hashlib.sha256(f"diabetes|seed={seed}|{data.split.val}|{data.split.test}|{data.limit}".encode()).hexdigest()
    return Table(arrays=(xs, ys), fingerprint=h, labeled_fingerprint=h, num_features=x.shape[1], y_mean=y_mean,
                 y_std=y_std)


def mlp(num_features: int, hidden: list[int] | None = None) -> Any:
    from torch import nn

    layers: list[Any] = []
    prev = num_features
    for w in hidden or [32]:
        layers += [nn.Linear(prev, w), nn.ReLU()]
        prev = w
    return nn.Sequential(*layers, nn.Linear(prev, 1))


@dataclass
class Share:
    x: Any
    y: Any
    teacher: Any
    device: Any

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def rows_device(self) -> Any:
        return self.x.device

    def batch(self, idx: Any) -> tuple[Any, Any, Any]:
        return self.x[idx], self.y[idx], None if self.teacher is None else self.teacher[idx]


class Regression(TaskKind):
    name = "regression"
    spec = KindSpec(data=RegressionData, teacher=RegressionTeacher, distill=RegressionDistill,
                    soft_targets=SoftTargetSpec, student=RegressionModel,
                    teacher_default=RegressionTeacher(params={"hidden": [64, 64]}),
                    student_default=RegressionModel(params={"hidden": [8]}))
    best_by = ("val_rmse", False)
    epoch_metrics = ("val_rmse", "val_loss", "val_gap", "train_loss", "train_kd", "train_ce", "samples_per_s")
    gate_metrics = ("test_rmse", "teacher_test_rmse", "rmse_ratio")
    headline = (("test_rmse", "rmse"), ("rmse_ratio", "rmse ratio"), ("num_params", "params"))

    def check_workflow(self, workflow: Any) -> None:
        if workflow.soft_targets.format != "logits":
            raise ValueError("soft_targets.format: regression stores the teacher's prediction (logits)")

    def load_data(self, data: Any, *, seed: int, storage: Any) -> Dataset:
        return load(data, seed)

    def describe(self, data: Any) -> str:
        return f"{data.num_features} features, a real-valued target"

    def manifest_meta(self, data: Any) -> dict[str, Any]:
        return {"num_features": data.num_features, "y_mean": data.y_mean, "y_std": data.y_std}

    def dims(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_features": int(meta["num_features"])}

    def target_width(self, dims: Mapping[str, Any]) -> int:
        return 1

    def check_name(self, name: str) -> None:
        if name != FAMILY:
            raise UserError(f"unknown regression model {name!r}; known: {FAMILY}")

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> Any:
        self.check_name(name)
        try:
            return mlp(dims["num_features"], **params)
        except TypeError as exc:
            raise UserError(f"bad params {dict(params)}: {exc}", where="params") from None

    def teacher_outputs(self, teachers: list[Any], x: Any, rule: str) -> Any:
        from tasks.models import teacher_forward

        return teacher_forward(teachers, x, "mean_logits", batch=1024)  # predictions average

    def decode_targets(self, targets: Mapping[str, Any], dims: Mapping[str, Any]) -> Any:
        return targets["logits"].float()

    def place(self, rows: Any, dims: Mapping[str, Any], device: Any) -> Share:
        teacher = rows.targets["logits"].float()[:, 0] if rows.targets else None
        return Share(rows.x.float(), rows.y.float(), teacher, device)

    def objective(self, logits: Any, y: Any, teacher: Any, loss: Any) -> tuple[Any, Any]:
        import torch

        pred = logits.float()[:, 0]
        label = torch.nn.functional.mse_loss(pred, y)
        if loss is None:
            return label, torch.stack((label.detach(), torch.zeros_like(label.detach()), label.detach()))
        kd = torch.nn.functional.mse_loss(pred, teacher)
        total = loss.alpha * kd + (1 - loss.alpha) * label
        return total, torch.stack((total.detach(), kd.detach(), label.detach()))

    def eval_counts(self, model: Any, rows: Any, dims: Mapping[str, Any], device: Any) -> Any:
        """[squared error to the label, rows, squared error to the teacher, rows with a teacher]: sums."""
        import torch

        with torch.no_grad():
            pred = model(rows.x.float().to(device))[:, 0]
        counts = torch.zeros(4, dtype=torch.float64)
        counts[0], counts[1] = ((pred - rows.y.float()) ** 2).sum(), len(rows)
        if rows.targets:
            counts[2], counts[3] = ((pred - rows.targets["logits"].float()[:, 0]) ** 2).sum(), len(rows)
        return counts

    def metrics(self, counts: Any, with_teacher: bool) -> dict[str, float]:
        se, n, gap, m = counts.tolist()
        out = {"rmse": math.sqrt(se / max(1.0, n)), "loss": se / max(1.0, n)}
        if with_teacher:
            out["gap"] = math.sqrt(gap / max(1.0, m))
        return out

    def epoch_summary(self, metrics: Mapping[str, float], dims: Mapping[str, Any]) -> str:
        return f"loss {metrics['train_loss']:.4f} val_rmse {metrics.get('val_rmse', float('nan')):.4f}"

    def report(self, done: Finished) -> Report:
        from tasks.evaluation import stream_metrics
        from tasks.store.store import SoftTargetStore

        scale = float(done.manifest["y_std"])  # back to the target's own units
        student = stream_metrics(self, done.student, done.manifest, done.storage)
        se = n = 0.0
        for test in SoftTargetStore(done.storage).batches(done.manifest, "test"):
            se += float(((test.targets["logits"].float()[:, 0] - test.y.float()) ** 2).sum())
            n += len(test)
        teacher_rmse = math.sqrt(se / max(1.0, n)) * scale
        s = {"test_rmse": student["rmse"] * scale, "rmse_ratio": student["rmse"] * scale / teacher_rmse}
        return Report(student=s, teacher={"test_rmse": teacher_rmse},
                      metrics={"test_rmse": s["test_rmse"], "teacher_test_rmse": teacher_rmse},
                      gate_values={"teacher_test_rmse": teacher_rmse},
                      line=f"  rmse: teacher {teacher_rmse:.2f}, student {s['test_rmse']:.2f}")

    def summary_table(self, teacher: Mapping[str, Any], student: Mapping[str, Any]
                      ) -> tuple[list[str], list[list[str]]]:
        return (["", "test rmse", "params"],
                [["teacher", f"{teacher['test_rmse']:.2f}", f"{teacher['num_params']:,}"],
                 ["student", f"{student['test_rmse']:.2f}", f"{student['num_params']:,}"]])

    def log_model(self, model: Any, student: ModelSpec, data: Any, manifest: Mapping[str, Any],
                  pip_requirements: list[str]) -> str:
        """safetensors weights and a JSON recipe, served by pyfunc.py: feature columns in, the target out."""
        import mlflow
        import pandas as pd
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/weights.safetensors")
            recipe = {"params": student.params, "num_features": manifest["num_features"],
                      "y_mean": manifest["y_mean"], "y_std": manifest["y_std"]}
            Path(tmp, "recipe.json").write_text(json.dumps(recipe))
            example = pd.DataFrame({f"x{i}": [0.0] for i in range(int(manifest["num_features"]))})
            info = mlflow.pyfunc.log_model(name="student", python_model=str(Path(__file__).with_name("pyfunc.py")),
                                           artifacts={"weights": f"{tmp}/weights.safetensors",
                                                      "recipe": f"{tmp}/recipe.json"},
                                           input_example=example, pip_requirements=pip_requirements)
        return info.model_uri
