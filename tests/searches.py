"""Fixtures of the search tests (tests/integration/test_search.py, tests/e2e/test_search_cli.py), loaded for the
whole suite from tests/conftest.py: a digits teacher checkpoint trained in-process (`search_teacher`: no
teacher training run), its soft targets computed once per session (`search_store`, copied into each test's
folder by `seed_store`), and the workflow around them (`base`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator.spec import validate
from tests.helpers import workflow


@pytest.fixture(scope="session")
def search_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP teacher (raw features in) trained in this process: a checkpoint file, as a user has."""
    from sklearn.datasets import load_digits

    from tasks.kinds.classification.models import build_model

    torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) , torch.tensor(d.target)
    model = build_model("mlp", {"hidden": [64]}, 64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for idx in torch.randperm(len(y)).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def base(search_teacher: Path, **overrides: Any) -> dict[str, Any]:
    """The small digits workflow with the checkpoint teacher (no teacher training run)."""
    return workflow(**{"teacher": {"model": "mlp", "params": {"hidden": [64]}, "checkpoint": str(search_teacher)},
                       **overrides})


@pytest.fixture(scope="session")
def search_store(ray_session: None, search_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root holding the teacher's soft targets."""
    from orchestrator import stages
    from orchestrator.teachers import load_teachers
    from orchestrator.workspace import storage_for

    root = tmp_path_factory.mktemp("store") / ".kdflow"
    spec = validate(base(search_teacher, **{"storage.root": str(root)}))
    storage = storage_for(spec)
    data = stages.load_data(spec, storage)
    stages.compute_soft_targets(spec, data, load_teachers(spec, data, storage), storage)
    return root


def seed_store(workdir: Path, search_store: Path) -> None:
    shutil.copytree(search_store / "soft_targets", workdir / ".kdflow" / "soft_targets")


def run_here(workdir: Path, monkeypatch: pytest.MonkeyPatch, search_teacher: Path, **overrides: Any) -> dict[str, Any]:
    """The whole workflow in this process, on the session's Ray, tracked in this test's own sqlite."""
    from orchestrator.pipeline import run_workflow

    (workdir / ".kdflow").mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/.kdflow/mlflow.db")
    return run_workflow(validate(base(search_teacher, **overrides)))


def load_study(url: str) -> Any:
    import optuna

    from orchestrator.search.study import open_storage

    storage = open_storage(url)
    (name,) = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def trial_runs(out: dict[str, Any]) -> list[Any]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(out["mlflow"]["tracking_uri"])
    client = MlflowClient()
    exp = client.get_experiment_by_name(out["mlflow"]["experiment"])
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{out['mlflow']['run_id']}'")
