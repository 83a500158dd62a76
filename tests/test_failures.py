"""How a `kdflow run` ends when something goes wrong, and two runs at once on one fresh store.

A failure of any kind ends with one line naming the stage, a non-zero exit, the MLflow run FAILED
(tagged with the stage and the message) and, with --json, {status: failed, stage, message} on stdout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, kdflow
from tests.helpers import write_workflow

pytestmark = pytest.mark.slow

BAD_MODEL = '''
import torch
from torch import nn


class Breaks(nn.Module):
    """Fine for the shape check (eval mode), fails in training: an error deep inside a Ray Train worker."""

    def __init__(self, num_features, num_classes):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x):
        if self.training:
            raise ArithmeticError("the student broke in training")
        return self.fc(x)


def make(num_features, num_classes):
    return Breaks(num_features, num_classes)
'''


def test_a_failure_inside_a_worker_ends_in_one_line_and_a_failed_result(workdir: Path) -> None:
    import mlflow

    (workdir / "badmodels.py").write_text(BAD_MODEL)
    path = write_workflow(workdir, **{"student.model": "badmodels:make", "student.params": {},
                                      "teacher.train.epochs": 2, "train.epochs": 2})
    proc = kdflow("run", path.name, "--json", cwd=workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdflow: stage student failed: ArithmeticError: the student broke in training"), last
    result = json.loads(proc.stdout)
    assert result["status"] == "failed" and result["stage"] == "student", result
    assert "ArithmeticError: the student broke in training" in result["message"]

    mlflow.set_tracking_uri(f"sqlite:///{workdir / '.kdflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["test-digits"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["kdflow.failed_stage"] == "student"
    assert "the student broke" in runs[0].data.tags["kdflow.error"]


def test_bad_input_with_json_still_prints_a_failed_result(workdir: Path) -> None:
    proc = kdflow("run", "missing.yaml", "--json", cwd=workdir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout) == {"workflow": None, "status": "failed", "stage": "validate",
                                       "message": "missing.yaml: workflow file not found"}


def test_two_runs_at_once_on_one_fresh_store_both_register(workdir: Path) -> None:
    """Two terminals, two temperatures, one storage root that does not exist yet."""
    paths = [write_workflow(workdir, f"t{t}.yaml", **{"distill.temperature": t, "teacher.train.epochs": 3,
                                                      "train.epochs": 2}) for t in (2, 8)]
    procs = [subprocess.Popen([str(BIN / "kdflow"), "run", p.name, "--json"], cwd=workdir, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in paths]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        # (under heavy load Ray Train's controller may log a timed-out call with its traceback: Ray's
        # chatter, not how the run ended)
        assert "multiple active Ray instances" not in err and "kdflow: " not in err, err[-3000:]
    versions = sorted(json.loads(out)["registry"]["version"] for out, _ in outs)
    assert versions == [1, 2]


def test_a_users_mistake_raised_on_a_worker_reaches_the_driver_whole(ray_session: None) -> None:
    """A UserError crosses Ray with its class and `where` (a subclass with its own constructor too), and is
    found inside a Ray task's error or a Ray Train run's per-worker failures, so the CLI exits 2 with it."""
    import pickle

    import ray
    from ray.train.v2.api.exceptions import WorkerGroupError

    from tasks.errors import UserError, user_error_in
    from tasks.pieces import Piece, SourceChanged

    changed = SourceChanged(Piece(name="part-1.parquet", path="/d/part-1.parquet", row_group=6, start=0, rows=9))
    back = pickle.loads(pickle.dumps(changed))
    assert type(back) is SourceChanged and back.where == "source" and str(back) == str(changed)

    @ray.remote(max_retries=0)
    def read() -> None:
        raise changed

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(read.remote())
    found = user_error_in(err.value)
    assert isinstance(found, SourceChanged) and found.under("data").where == "data.source"
    assert "part-1.parquet (row group 6) changed" in found.message
    wrapped = WorkerGroupError("training failed", {0: RuntimeError("rank 0 ok"), 1: UserError("no", where="k")})
    assert user_error_in(wrapped).where == "k"
    assert user_error_in(RuntimeError("the teacher's own bug")) is None
