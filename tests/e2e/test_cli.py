"""The `kdflow` command's answers to bad input: exit 2, the key or file named, no traceback, nothing started."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import kdflow
from tests.helpers import write_workflow


def test_cli_bad_input_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write_workflow(tmp_path, **{"distill.alpha": 1.7})
    for command in ("validate", "run"):
        proc = kdflow(command, str(path), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "distill.alpha" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""
    assert not (tmp_path / ".kdflow").exists()  # nothing was started for a bad spec


def test_cli_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    proc = kdflow("validate", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "not found" in proc.stderr
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    proc = kdflow("run", "bad.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    proc = kdflow("validate", "list.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "mapping" in proc.stderr


def test_missing_parquet_source_exits_2_through_the_cli(workdir: Path) -> None:
    wf = write_workflow(workdir, **{"data.source": str(workdir / "nowhere" / "*.parquet")})
    proc = kdflow("run", str(wf), cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"data.source: no files match '{workdir}/nowhere/*.parquet'" in proc.stderr


def test_schema_command_prints_the_workflow_schema(tmp_path: Path) -> None:
    from orchestrator.spec import workflow_schema

    proc = kdflow("schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == workflow_schema() and proc.stderr == ""


def test_version_flag() -> None:
    from tests.conftest import REPO

    proc = kdflow("--version", cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("kdflow 0.")
