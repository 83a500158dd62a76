"""A kind of task from outside kdflow: a separate package (tests/data/kdflow_tiny_kind, `task: regression`)
installed with pip adds a kind through the `kdflow.kinds` entry point, and a workflow of that kind runs end
to end (its data, targets, objective, report, gates and served model) without any edit to kdflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, kdflow

TINY_KIND = REPO / "tests" / "data" / "kdflow_tiny_kind"
WORKFLOW = {"name": "tiny-regression", "task": "regression", "seed": 0,
            "teacher": {"params": {"hidden": [64, 64]}, "train": {"epochs": 40, "batch_size": 32}},
            "student": {"params": {"hidden": [4]}},
            "train": {"epochs": 30, "batch_size": 32, "early_stopping": {"patience": 10}},
            "distill": {"alpha": 0.5},
            "registry": {"promote": {"gates": {"rmse_ratio": "<= 2.0", "num_params": "<= 1000"}}}}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package installed as a user would (pip), into a folder of its own on PYTHONPATH (built from a copy:
    pip builds in the source tree)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / TINY_KIND.name
    shutil.copytree(TINY_KIND, source)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (next(target.glob("kdflow_tiny_kind-*.dist-info")) / "entry_points.txt").read_text().count("regression")
    return target


def env_with(*paths: Path, **more: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([*map(str, paths), str(REPO)]), **more}


@pytest.mark.slow
def test_an_installed_package_adds_a_kind_that_runs_end_to_end(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(WORKFLOW))
    # its own local Ray: the session's workers were started without the package on their path, as a
    # cluster's would be without it installed
    proc = kdflow("run", "wf.yaml", "--json", cwd=tmp_path, env=env_with(installed, RAY_ADDRESS=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    s, t = result["student"], result["teacher"]
    assert result["task"] == "regression" and result["status"] == "succeeded"
    # the kind's own report: the diabetes target's spread is ~77, a fit that learned anything is well under it
    assert 30 < t["test_rmse"] < 70 and 30 < s["test_rmse"] < 80 and s["rmse_ratio"] == pytest.approx(
        s["test_rmse"] / t["test_rmse"])
    assert s["num_params"] == 10 * 4 + 4 + 4 + 1 and t["num_params"] > 4000
    assert result["soft_targets"]["rows"] == 442 and result["soft_targets"]["computed_shards"] >= 3
    assert result["registry"]["promoted"] and {"rmse_ratio", "num_params"} <= set(result["registry"]["gates"])
    assert "Traceback" not in proc.stderr and "rmse: teacher" in proc.stderr

    # the registered student serves through the kind's own pyfunc: feature columns in, the target out
    serve = "\n".join(["import mlflow, pandas as pd", f"mlflow.set_tracking_uri({result['mlflow']['tracking_uri']!r})",
                       "m = mlflow.pyfunc.load_model('models:/tiny-regression-student@champion')",
                       "columns = {f'x{i}': [0.0, 1.0] for i in range(10)}",
                       "print([float(v) for v in m.predict(pd.DataFrame(columns))])"])
    served = subprocess.run([sys.executable, "-c", serve], check=False, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, **env_with(installed)})
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = json.loads(served.stdout.strip().splitlines()[-1])
    assert len(predictions) == 2 and all(25 < p < 350 for p in predictions)  # the target's own units


def test_the_installed_kind_is_in_the_schema_and_validates_its_own_keys(installed: Path, tmp_path: Path) -> None:
    env = env_with(installed)
    schema = json.loads(kdflow("schema", cwd=tmp_path, env=env).stdout)
    assert "regression" in schema["properties"]["task"]["enum"] and "RegressionWorkflow" in schema["$defs"]
    for change, key, says in (({"data": {"seq_len": 8}}, "data.seq_len", "a causal_lm key, but task is regression"),
                              ({"distill": {"loss": "kl"}}, "distill.loss", "mse only"),
                              ({"train": {"early_stopping": {"metric": "val_accuracy"}}},
                               "train.early_stopping.metric", "val_rmse")):
        (tmp_path / "wf.yaml").write_text(yaml.safe_dump({**WORKFLOW, **change}))
        proc = kdflow("validate", "wf.yaml", cwd=tmp_path, env=env)
        assert proc.returncode == 2 and key in proc.stderr and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # without the package the task is unknown, naming the kinds there are
    proc = kdflow("validate", "wf.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown task kind 'regression'" in proc.stderr and "causal_lm" in proc.stderr


def fake_distribution(folder: Path, name: str, entry: str) -> Path:
    """An installed distribution as importlib.metadata finds it: a dist-info folder with its entry points."""
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdflow.kinds]\n{entry}\n")
    return folder


@pytest.mark.parametrize(("entry", "says"), [
    ("classification = tiny_kind:Regression", "a kind named 'classification' is already registered by kdflow"),
    ("regresion = tiny_kind:Regression", "names the kind 'regresion' but its name is 'regression'"),
    ("broken = tiny_kind:Nope", "cannot load the kind 'tiny_kind:Nope'"),
])
def test_a_kind_that_takes_a_name_or_does_not_load_is_refused_naming_its_entry_point(
        installed: Path, tmp_path: Path, entry: str, says: str) -> None:
    other = fake_distribution(tmp_path / "other", "other-kind", entry)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({"name": "w"}))
    proc = subprocess.run([str(BIN / "kdflow"), "validate", "wf.yaml"], check=False, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={**os.environ, **env_with(installed, other)})
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "other-kind" in proc.stderr and "Traceback" not in proc.stderr
