"""`kdflow cache list|show|verify|rm` on a real store, and a corrupted shard or a foreign manifest that the
command and a run refuse (exit 2 naming it), deleting nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator import stages
from orchestrator.teachers import load_teachers
from orchestrator.workspace import storage_for
from tasks.store.store import SoftTargetStore
from tests.conftest import kdflow
from tests.helpers import write_workflow


@pytest.mark.slow
def test_corrupted_shard_or_foreign_manifest_exits_2_naming_it_and_deletes_nothing(ray_session: None,
                                                                                 workdir: Path) -> None:
    wf = checkpoint_workflow(workdir)
    m, entry = stored_entry(wf)
    shard = entry / m["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = snapshot(entry)

    proc = kdflow("run", str(wf), "--json", cwd=workdir)
    assert_user_error(proc, str(shard), "checksum mismatch", f"kdflow cache rm {m['key']}")
    # with --json a failed run still prints its one result object, and nothing stored changed
    result = json.loads(proc.stdout)
    assert result["status"] == "failed" and result["stage"] == "soft targets" and "checksum mismatch" in result["message"]
    assert snapshot(entry) == before

    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps({**manifest, "format": "topk", "top_k": 3}))
    before = snapshot(entry)
    proc = kdflow("run", str(wf), "--json", cwd=workdir)
    assert_user_error(proc, str(entry / "manifest.json"), "format='topk'", "'logits'")
    assert snapshot(entry) == before


@pytest.mark.slow
def test_cache_commands_list_show_verify_and_remove_entries(ray_session: None, workdir: Path) -> None:
    wf = checkpoint_workflow(workdir)
    m, entry = stored_entry(wf)

    listed = kdflow("cache", "list", "--json", "--workflow", str(wf), cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    [e] = json.loads(listed.stdout)
    assert (e["key"], e["complete"], e["rows"], e["format"]) == (m["key"], True, 1797, "logits")
    assert len(e["teachers"]) == 1

    shown = kdflow("cache", "show", m["key"], cwd=workdir)
    assert shown.returncode == 0 and json.loads(shown.stdout)["splits"] == m["splits"]
    assert "matches its checksum" in kdflow("cache", "verify", m["key"], cwd=workdir).stdout

    # a manifest cut short (say, copied by hand) is refused, and the entry is left alone
    full = (entry / "manifest.json").read_text()
    (entry / "manifest.json").write_text(full[: len(full) // 2])
    before = snapshot(entry)
    assert_user_error(kdflow("cache", "show", m["key"], cwd=workdir), str(entry / "manifest.json"), "not valid JSON")
    broken = json.loads(full)
    broken["splits"]["train"]["shards"].pop(1)
    (entry / "manifest.json").write_text(json.dumps(broken))
    assert_user_error(kdflow("cache", "verify", m["key"], cwd=workdir), "do not tile")
    listed = kdflow("cache", "list", cwd=workdir)
    assert listed.returncode == 0 and "INCOMPLETE" in listed.stdout and "do not tile" in listed.stdout
    assert {k for k in snapshot(entry)} == set(before)

    removed = kdflow("cache", "rm", m["key"], cwd=workdir)
    assert removed.returncode == 0 and not entry.exists()
    assert_user_error(kdflow("cache", "rm", m["key"], cwd=workdir), "no soft-target entry", m["key"])


def checkpoint_workflow(workdir: Path, **overrides: Any) -> Path:
    """A workflow whose teacher is a checkpoint file, so no training is needed to reach the store."""
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10)).state_dict(), workdir / "teacher.pt")
    return write_workflow(workdir, **{"teacher": {"model": "mlp", "params": {"hidden": []},
                                                  "checkpoint": str(workdir / "teacher.pt")},
                                      "train.epochs": 1, **overrides})


def stored_entry(wf: Path) -> tuple[dict[str, Any], Path]:
    """Fill the store in-process exactly as `kdflow run wf` would."""
    from orchestrator.spec import load_workflow

    spec = load_workflow(wf)
    storage = storage_for(spec)
    data = stages.load_data(spec, storage)
    m, _ = stages.compute_soft_targets(spec, data, load_teachers(spec, data, storage), storage)
    return m, Path(SoftTargetStore(storage).dir(m["key"]))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
