"""Searches through the `kdflow` command: a bad search spec exits 2; a search killed mid-way resumes keeping
its finished trials."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, kdflow
from tests.helpers import SPACE, kill_session, write_workflow
from tests.searches import base, load_study, seed_store, trial_runs


def test_bad_search_spec_exits_2_from_the_command(tmp_path: Path) -> None:
    path = write_workflow(tmp_path, search={"trials": 2, "space": {
        "distill.alpha": {"type": "float", "low": 0.9, "high": 0.1}}})
    proc = kdflow("run", str(path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "search.space.distill.alpha" in proc.stderr


@pytest.mark.slow
def test_killed_search_resumes_keeping_its_finished_trials(workdir: Path, search_store: Path, search_teacher: Path) -> None:
    seed_store(workdir, search_store)
    # enough trials, and epochs, that the kill lands mid-search: with 4 trials the two in flight when the
    # second one completed sometimes finished too before the kill (a CI failure, 4 < 4), and once warm trials
    # took ~0.1 s, 8 trials of 2 epochs all finished between two polls (8 < 8)
    trials = 12
    path = workdir / "wf.yaml"
    path.write_text(json.dumps(base(search_teacher, **{"train.epochs": 20, "search": {
        "trials": trials, "concurrency": 2, "pruner": "none", "space": SPACE}})))  # JSON is YAML
    db = workdir / ".kdflow" / "optuna.db"
    ray_tmp = tempfile.mkdtemp(prefix="kd-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "TMPDIR": ray_tmp}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(workdir / "first.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "kdflow"), "run", str(path), "--json"], cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while len(complete_trials(db)) < 2:
            assert proc.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no two trials completed in time"
            time.sleep(0.05)
    finally:
        kill_session(proc)  # the driver, its local Ray and every trial in flight
        shutil.rmtree(ray_tmp, ignore_errors=True)
    before = complete_trials(db)
    assert 2 <= len(before) < trials

    second = kdflow("run", str(path), "--json", cwd=workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    out = json.loads(second.stdout)
    s = out["search"]
    assert s["completed"] + s["pruned"] == trials
    assert complete_trials(db).items() >= before.items()  # kept with their params and values
    study = load_study(s["storage"])
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["error"].startswith("interrupted") for t in interrupted)
    assert not list((workdir / ".kdflow" / "checkpoints").glob(f"{s['study']}-trial-*"))  # their leftovers too
    rerun = {int(r.data.tags["kdflow.search.trial"]) for r in trial_runs(out)}
    assert rerun and not rerun & set(before)  # the finished trials were not trained again
    assert len(rerun) == trials - len(before)
    assert re.search(rf"resuming study .*: {len(before)} of {trials} trials already done", second.stderr)
    assert re.search(rf"trial {trials}/{trials} #\d+ \[complete\] .*val_accuracy=", second.stderr)


def complete_trials(db: Path) -> dict[int, tuple[dict[str, str], float]]:
    """Read-only look at a study's complete trials: number -> (params, value)."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT t.trial_id, t.number FROM trials t WHERE t.state = 'COMPLETE'").fetchall()
        out = {}
        for trial_id, number in rows:
            params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id = ?",
                                      (trial_id,)).fetchall())
            (value,) = con.execute("SELECT value FROM trial_values WHERE trial_id = ?", (trial_id,)).fetchone()
            out[number] = (params, value)
        return out
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    finally:
        con.close()
