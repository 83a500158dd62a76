"""The soft-target store: content-addressed, resumable, checked on every read, on a real local Ray.

Teachers that count, fail or crawl are classes defined inside the tests, so Ray ships them by value
and no production code carries a test hook. The killed-precompute test kills a real process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import torch

from orchestrator import stages
from orchestrator.spec import validate
from orchestrator.teachers import Teacher
from orchestrator.workspace import storage_for
from tasks.errors import ShardFailed, UserError
from tasks.kinds.classification import data as data_module
from tasks.kinds.classification.data import load_dataset
from tasks.kinds.classification.targets import teacher_logits
from tasks.models import weights_digest
from tasks.storage import Storage
from tasks.store.store import SPLITS, SoftTargetStore, cache_key, shard_ranges
from tests.conftest import REPO
from tests.helpers import kill_session, precompute, workflow

# Ray ships the test-only teachers below by value: workers need not import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def digits_splits(val: float = 0.15) -> tuple[Any, dict[str, tuple[np.ndarray, np.ndarray]]]:
    d = load_dataset("sklearn:digits", val=val)
    return d, {s: (d.x[s], d.y[s]) for s in SPLITS}


def linear_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 10)


def shard_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if ".tmp-" not in p.name)


def all_row_ids(store: SoftTargetStore, manifest: dict[str, Any]) -> np.ndarray:
    return np.concatenate([store.read(manifest, s).row_id.numpy() for s in SPLITS if manifest["splits"][s]["rows"]])


# ---------------------------------------------------------------- formats and row ids


@pytest.mark.parametrize("format,dtype,top_k,val,atol", [
    ("logits", "float32", None, 0.15, 1e-6),
    ("logits", "float16", None, 0.15, 5e-3),
    ("logits", "bfloat16", None, 0.0, 3e-2),  # an empty val split too
    ("topk", "float16", 3, 0.15, 5e-3),
])
def test_each_format_round_trips_raw_logits_with_every_row_once(ray_session: None, workdir: Path, format: str,
                                                                 dtype: str, top_k: int | None, val: float,
                                                                 atol: float) -> None:
    _, splits = digits_splits(val)
    teacher = linear_teacher()
    store = SoftTargetStore(Storage(".kdflow"))
    m, stats = precompute(store, "k1", [teacher], splits, shards=3, format=format, dtype=dtype, top_k=top_k,
                         ensemble="mean_probs", meta={"num_classes": 10})

    assert stats.reused is False and stats.computed_shards == len(shard_files(workdir)) == 3 + (val > 0) + 1
    assert stats.forward_rows == m["rows"] == 1797
    np.testing.assert_array_equal(np.sort(all_row_ids(store, m)), np.arange(1797))
    assert len(np.unique(all_row_ids(store, m))) == 1797
    for split in SPLITS:
        for shard in m["splits"][split]["shards"]:
            path = workdir / ".kdflow" / "soft_targets" / "k1" / shard["path"]
            assert path.stat().st_size == shard["bytes"] and shard["rows"] == shard["row_stop"] - shard["row_start"]
        if not len(splits[split][1]):
            assert m["splits"][split] == {"rows": 0, "shards": []}
            continue
        batch = store.read(m, split)
        np.testing.assert_array_equal(batch.x.numpy(), splits[split][0])
        np.testing.assert_array_equal(batch.y.numpy(), splits[split][1])
        with torch.no_grad():
            want = teacher(torch.from_numpy(splits[split][0]))  # T=1: no temperature in the store
        got = teacher_logits(batch.targets, 10)
        if format == "logits":
            torch.testing.assert_close(got, want, atol=atol, rtol=atol)
        else:
            top = want.topk(top_k).values
            torch.testing.assert_close(got.topk(top_k).values, top, atol=atol, rtol=atol)
            torch.testing.assert_close(torch.logsumexp(got, -1), torch.logsumexp(want, -1), atol=1e-2, rtol=1e-3)
    # a slice in the middle reads only what it asks for, in order
    part = store.read(m, "train", 100, 900)
    np.testing.assert_array_equal(part.row_id.numpy(), np.arange(100, 900))


# ---------------------------------------------------------------- cache key, reuse, ensemble (the stage)


class Counting(torch.nn.Module):
    """Appends the size of every forward batch to a file: counts teacher forwards across Ray workers."""

    def __init__(self, log: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(64, 10)
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{x.shape[0]}\n")
        return self.net(x)


def forwarded_rows(log: Path) -> int:
    return sum(int(n) for n in log.read_text().split()) if log.exists() else 0


def stage_teachers(models: list[torch.nn.Module]) -> list[Teacher]:
    return [Teacher(m, f"test:{i}", weights_digest(m)) for i, m in enumerate(models)]


def test_rerun_reuses_soft_targets_with_no_teacher_forward(ray_session: None, workdir: Path) -> None:
    spec = validate(workflow())
    storage = storage_for(spec)
    data = stages.load_data(spec, storage)
    log = workdir / "forwards.log"
    teachers = stage_teachers([Counting(str(log))])

    first, first_stats = stages.compute_soft_targets(spec, data, teachers, storage)
    assert first_stats.reused is False and forwarded_rows(log) == first_stats.forward_rows == 1797
    second, second_stats = stages.compute_soft_targets(spec, data, teachers, storage)
    assert second_stats.reused is True and second_stats.forward_rows == 0 and second_stats.computed_shards == 0
    assert forwarded_rows(log) == 1797  # the teacher never ran again
    assert second["key"] == first["key"]
    # a search over temperature or alpha reuses the same targets
    hot = validate(workflow(**{"distill.temperature": 9.0, "distill.alpha": 0.2}))
    assert stages.soft_target_key(hot, data, teachers) == first["key"]


def test_each_input_of_the_soft_targets_changes_the_key(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def key(teachers: list[torch.nn.Module] | None = None, **overrides: Any) -> str:
        spec = validate(workflow(**overrides))
        data = stages.load_data(spec, storage_for(spec))
        return stages.soft_target_key(spec, data, stage_teachers(teachers or [linear_teacher()]))

    base = key()
    assert key() == base  # deterministic: a fresh load, a fresh teacher object
    changed = {
        "format": key(**{"soft_targets.format": "topk", "soft_targets.top_k": 3}),
        "top_k": key(**{"soft_targets.format": "topk", "soft_targets.top_k": 4}),
        "dtype": key(**{"soft_targets.dtype": "float32"}),
        "split": key(**{"data.split.val": 0.2}),
        "seed (row order of the split)": key(seed=1),
        "rows": key(**{"data.limit": 1500}),
        "teacher weights": key([linear_teacher(seed=1)]),
        "a second teacher": key([linear_teacher(), linear_teacher(seed=1)]),
        "ensemble rule": key([linear_teacher(), linear_teacher(seed=1)], **{"soft_targets.ensemble": "mean_logits"}),
    }
    monkeypatch.setattr(data_module, "PREPROCESSING", "standardize-v2")
    changed["preprocessing"] = key()
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    # teacher order is not an input: a mean does not care
    assert cache_key(["a", "b"], "d", "logits", "float16", None, "mean_probs") == cache_key(
        ["b", "a"], "d", "logits", "float16", None, "mean_probs")


@pytest.mark.parametrize("rule", ["mean_probs", "mean_logits"])
def test_multi_teacher_entry_stores_the_ensemble_and_records_every_teacher(ray_session: None, workdir: Path,
                                                                          rule: str) -> None:
    spec = validate(workflow(**{"soft_targets.ensemble": rule, "soft_targets.dtype": "float32"}))
    storage = storage_for(spec)
    data = stages.load_data(spec, storage)
    models = [linear_teacher(0), linear_teacher(1), linear_teacher(2)]
    m, _ = stages.compute_soft_targets(spec, data, stage_teachers(models), storage)

    assert [t["digest"] for t in m["teachers"]] == [weights_digest(t) for t in models]
    assert m["ensemble"] == rule
    test = SoftTargetStore(storage).read(m, "test")
    with torch.no_grad():
        outs = torch.stack([t(test.x) for t in models])
    got = teacher_logits(test.targets, 10)
    if rule == "mean_logits":
        torch.testing.assert_close(got, outs.mean(0), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.softmax(-1), outs.softmax(-1).mean(0), atol=1e-5, rtol=1e-5)


def test_transfer_rows_are_labeled_by_the_teacher_in_the_same_precompute(ray_session: None, workdir: Path) -> None:
    spec = validate(workflow(**{"data.source": "mnist1d", "data.transfer": 300, "data.split.val": 0.1,
                                               "data.split.test": 0.2, "soft_targets.dtype": "float32"}))
    storage = storage_for(spec)
    data = stages.load_data(spec, storage)
    torch.manual_seed(0)
    teacher = torch.nn.Linear(40, 10)
    m, stats = stages.compute_soft_targets(spec, data, stage_teachers([teacher]), storage)

    assert m["transfer_rows"] == 300 and m["splits"]["train"]["rows"] == data.rows("train") + 300
    assert stats.forward_rows == m["rows"] == 5300  # one precompute labels the transfer rows too
    train = SoftTargetStore(storage).read(m, "train")
    unlabeled = train.y == -1  # the student gets only the distillation term on these
    assert int(unlabeled.sum()) == 300
    # interleaved, not appended: each half (one data-parallel worker's share) holds transfer rows
    half = len(train.y) // 2
    assert unlabeled[:half].any() and unlabeled[half:].any()
    np.testing.assert_array_equal(np.sort(train.y[~unlabeled].numpy()), np.sort(data.y["train"]))
    got = train.x[unlabeled].numpy()
    want_x = data.x["transfer"]
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want_x[np.lexsort(want_x.T)])
    with torch.no_grad():
        want = teacher(train.x[unlabeled])
    torch.testing.assert_close(teacher_logits(train.targets, 10)[unlabeled], want)


# ---------------------------------------------------------------- task failures


class Flaky(torch.nn.Module):
    """Fails the first forward of every shard (once per distinct first row), then works."""

    def __init__(self, marks: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(64, 10)
        self.marks = marks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark = Path(self.marks) / hashlib.sha256(x[0].numpy().tobytes()).hexdigest()
        if not mark.exists():
            mark.touch()
            raise RuntimeError("flaky teacher: first try fails")
        return self.net(x)


class FailsOnSentinel(torch.nn.Module):
    """Raises on any batch holding the sentinel feature value while the switch file exists."""

    SENTINEL = 12345.0

    def __init__(self, switch: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(64, 10)
        self.switch = switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(self.switch) and bool((x == self.SENTINEL).any()):
            raise RuntimeError("teacher cannot take this row")
        return self.net(x)


def test_failed_shard_tasks_are_retried(ray_session: None, workdir: Path) -> None:
    _, splits = digits_splits()
    (workdir / "marks").mkdir()
    store = SoftTargetStore(Storage(".kdflow"))
    m, stats = precompute(store, "flaky", [Flaky(str(workdir / "marks"))], splits, shards=3, format="logits",
                         dtype="float16", top_k=None, ensemble="mean_probs", meta={}, max_retries=2)
    assert stats.computed_shards == 5 and len(list((workdir / "marks").iterdir())) == 5  # each failed once
    np.testing.assert_array_equal(all_row_ids(store, m), np.arange(1797))


class DiesOnce(torch.nn.Module):
    """Kills its own process at its first forward (the marker file says it did), then works."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(64, 10)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return self.net(x)
        os._exit(1)


@pytest.mark.slow
def test_shards_on_a_warm_actor_are_retried_and_a_dead_actor_replaced(ray_session: None, workdir: Path) -> None:
    """A small precompute's shards as calls on one warm actor (`Slot.shard`, what a single-worker run uses):
    a teacher error is retried on the same process, a process that dies is replaced, the manifest comes last."""
    from orchestrator.fitting import Slot

    _, splits = digits_splits()
    (workdir / "marks").mkdir()
    store = SoftTargetStore(Storage(".kdflow"))
    slot = Slot(0, label="warm worker")
    try:
        slot.start(1)
        args: dict[str, Any] = {"shards": 3, "format": "logits", "dtype": "float16", "top_k": None,
                                "ensemble": "mean_probs", "meta": {}, "max_retries": 1, "runner": slot.shard}
        m, stats = precompute(store, "warm-flaky", [Flaky(str(workdir / "marks"))], splits, **args)
        assert stats.computed_shards == 5 and len(list((workdir / "marks").iterdir())) == 5  # each failed once
        info = slot.info()
        assert info is not None and info["shards"] == 10 and slot.replaced == 0  # 5 failed + 5 retried, one process
        np.testing.assert_array_equal(all_row_ids(store, m), np.arange(1797))

        m, stats = precompute(store, "warm-dies", [DiesOnce(str(workdir / "died"))], splits, **args)
        assert (workdir / "died").exists() and slot.replaced == 1  # the first shard killed its worker
        assert stats.computed_shards == 5 and store.manifest("warm-dies") == m
        np.testing.assert_array_equal(all_row_ids(store, m), np.arange(1797))
        info = slot.info()
        assert info is not None and info["pid"] != os.getpid() and info["shards"] == 5  # the fresh worker's
    finally:
        slot.close()


def test_shard_that_keeps_failing_fails_naming_it_and_the_written_shards_stay(ray_session: None,
                                                                            workdir: Path) -> None:
    _, splits = digits_splits()
    x = splits["train"][0].copy()
    a, b = shard_ranges(len(x), 3)[1]  # the second of three train shards
    x[(a + b) // 2, 5] = FailsOnSentinel.SENTINEL
    splits["train"] = (x, splits["train"][1])
    switch = workdir / "failing"
    switch.touch()
    store = SoftTargetStore(Storage(".kdflow"))
    teacher = FailsOnSentinel(str(switch))
    args: dict[str, Any] = {"shards": 3, "format": "logits", "dtype": "float16", "top_k": None,
                            "ensemble": "mean_probs", "meta": {}, "max_retries": 1}

    with pytest.raises(ShardFailed) as failed:
        precompute(store, "sticky", [teacher], splits, **args)
    message = str(failed.value)
    assert "train/part-00001-of-00003.parquet" in message and f"rows {a}..{b - 1} of train" in message
    assert "teacher cannot take this row" in message and "1 of 5" in message
    written = shard_files(workdir)
    assert len(written) == 4 and not any("train/part-00001" in str(p) for p in written)
    assert store.manifest("sticky") is None
    with pytest.raises(UserError, match="no complete manifest"):
        store.require("sticky")

    before = {p: p.stat().st_mtime_ns for p in written}
    switch.unlink()  # the cause is fixed: the rerun computes the one missing shard
    m, stats = precompute(store, "sticky", [teacher], splits, **args)
    assert stats.computed_shards == 1 and stats.forward_rows == b - a
    assert {p: p.stat().st_mtime_ns for p in written} == before
    np.testing.assert_array_equal(all_row_ids(store, m), np.arange(1797))


# ---------------------------------------------------------------- a precompute killed for real

class Slow(torch.nn.Module):
    """One forward at a time (a file lock), each taking a while: shards land one by one, apart enough to kill."""

    def __init__(self, lock: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(64, 10)
        self.lock = lock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import fcntl

        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            time.sleep(0.8)
            return self.net(x)


PRECOMPUTE_ARGS: dict[str, Any] = {"shards": 6, "format": "logits", "dtype": "float16", "top_k": None,
                                   "ensemble": "mean_probs", "meta": {}}

# the job a user's run would be: its own process, its own local Ray (no dashboard: quicker to start), the
# same teacher and data
PRECOMPUTE_JOB = """
import os

import ray

from tasks.kinds.classification.data import load_dataset
from tasks.store.store import SPLITS, SoftTargetStore
from tasks.storage import Storage
from tests.helpers import precompute
from tests.integration.test_soft_targets import PRECOMPUTE_ARGS, Slow

for attempt in range(3):  # on an overloaded box a raylet can miss Ray's fixed 30 s start-up window
    try:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        break
    except Exception as exc:
        if "timed out during startup" not in str(exc) or attempt == 2:
            raise
        ray.shutdown()
d = load_dataset("sklearn:digits")
precompute(SoftTargetStore(Storage(".kdflow")), "killed", [Slow(os.path.abspath("teacher.lock"))],
                                               {s: (d.x[s], d.y[s]) for s in SPLITS}, **PRECOMPUTE_ARGS)
"""


@pytest.mark.slow
def test_killed_precompute_resumes_computing_only_the_missing_shards(ray_session: None, workdir: Path) -> None:
    (workdir / "job.py").write_text(PRECOMPUTE_JOB)
    entry = workdir / ".kdflow" / "soft_targets" / "killed"
    with open(workdir / "job.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "job.py"], cwd=workdir, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(shard_files(entry)) < 3 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, (workdir / "job.log").read_text()[-3000:]
        finally:
            kill_session(proc)
    kept = {p: p.stat().st_mtime_ns for p in shard_files(entry)}
    assert 3 <= len(kept) < 8 and not (entry / "manifest.json").exists()
    # what a writer killed mid-shard leaves (whether or not this kill caught one): never taken for a shard
    (entry / "test").mkdir(exist_ok=True)
    (entry / "test" / "part-00000-of-00001.parquet.tmp-0badf00d").write_bytes(b"half a shard")

    _, splits = digits_splits()
    store = SoftTargetStore(Storage(".kdflow"))
    result, stats = precompute(store, "killed", [Slow(str(workdir / "teacher.lock"))], splits, **PRECOMPUTE_ARGS)
    assert stats.reused is False and stats.computed_shards == 8 - len(kept)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished shards were not recomputed
    assert stats.forward_rows == sum(s["rows"] for sp in SPLITS for s in result["splits"][sp]["shards"]
                                         if entry / s["path"] not in kept)
    assert not [p for p in entry.rglob("*") if ".tmp-" in p.name]  # the killed writers' temp files are gone
    np.testing.assert_array_equal(all_row_ids(store, store.require("killed")), np.arange(1797))  # each row once


# ---------------------------------------------------------------- bad input, through the real CLI


def test_readers_refuse_an_entry_without_a_whole_manifest(ray_session: None, workdir: Path) -> None:
    _, splits = digits_splits()
    store = SoftTargetStore(Storage(".kdflow"))
    m, _ = precompute(store, "whole", [linear_teacher()], splits, shards=3, format="logits", dtype="float16",
                         top_k=None, ensemble="mean_probs", meta={"num_classes": 10})
    path = workdir / ".kdflow" / "soft_targets" / "whole" / "manifest.json"
    good = path.read_text()
    cases = {
        "version": {**m, "version": 99},
        "key": {**m, "key": "other"},
        "cover": {**m, "splits": {**m["splits"], "test": {**m["splits"]["test"], "rows": 300}}},
        "checksum": {**m, "splits": {**m["splits"], "val": {"rows": m["splits"]["val"]["rows"], "shards": [
            {k: v for k, v in m["splits"]["val"]["shards"][0].items() if k != "sha256"}]}}},
    }
    for needle, bad in cases.items():
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=needle) as err:
            store.require("whole")
        assert str(path) in str(err.value)
    path.write_text(good)
    assert store.require("whole")["rows"] == 1797
    # asking a stored entry for another format is refused rather than mixed
    with pytest.raises(UserError, match="format='logits' but the run expects 'topk'"):
        precompute(store, "whole", [linear_teacher()], splits, shards=3, format="topk", dtype="float16", top_k=3,
                         ensemble="mean_probs", meta={})


def test_leftover_shard_with_foreign_rows_is_recomputed_not_trusted(ray_session: None, workdir: Path) -> None:
    _, splits = digits_splits()
    store = SoftTargetStore(Storage(".kdflow"))
    args: dict[str, Any] = {"shards": 3, "format": "logits", "dtype": "float16", "top_k": None,
                            "ensemble": "mean_probs", "meta": {}}
    precompute(store, "a", [linear_teacher()], splits, **args)
    src = workdir / ".kdflow" / "soft_targets" / "a"
    dst = workdir / ".kdflow" / "soft_targets" / "b"
    # an interrupted entry whose train shard 0 holds shard 1's rows (a hand copy gone wrong)
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "part-00000-of-00003.parquet").write_bytes(
        (src / "train" / "part-00001-of-00003.parquet").read_bytes())
    (dst / "train" / "part-00002-of-00003.parquet").write_bytes(
        (src / "train" / "part-00002-of-00003.parquet").read_bytes())
    m, stats = precompute(store, "b", [linear_teacher()], splits, **args)
    assert stats.computed_shards == 4  # shard 2 was kept; shard 0 (foreign rows) and the rest were computed
    np.testing.assert_array_equal(all_row_ids(store, m), np.arange(1797))


def test_a_source_that_changes_under_the_shard_tasks_is_the_users_error_and_the_written_shards_stay(
        ray_session: None, workdir: Path) -> None:
    """A shard task (a Ray task, or a call on the run's warm actor) that finds a file changed since the data
    stage raises the data stage's exit-2 error naming the source, not a failed stage; shards of rows that
    did not change are written and kept for the rerun."""
    import functools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.fitting import Slot
    from tasks.pieces import SourceChanged
    from tests.unit.test_pieces import FEATURES, SPLIT, source

    src = source(workdir, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})
    d = load_dataset(src, features=FEATURES, **SPLIT)
    rows = d.precompute_rows(SPLIT["seed"])
    t = pq.read_table(workdir / "part-1.parquet")  # after the data stage, one value in the last file changes
    f0 = t.column("f0").to_numpy().copy()
    f0[-1] += 1.0
    pq.write_table(t.set_column(1, "f0", pa.array(f0)), workdir / "part-1.parquet", row_group_size=37)
    store = SoftTargetStore(Storage(".kdflow"))
    args: dict[str, Any] = {"shards": 3, "format": "logits", "dtype": "float32", "top_k": None,
                            "ensemble": "mean_probs", "meta": {}, "max_retries": 1}
    teacher = torch.nn.Linear(3, 3)
    warm = Slot(0, label="test warm worker")
    try:
        for key, runner in (("tasks", None), ("warm", functools.partial(warm.shard, threads=1))):
            with pytest.raises(SourceChanged) as err:
                precompute(store, key, [teacher], rows, runner=runner, **args)
            assert err.value.where == "source" and "part-1.parquet" in str(err.value), key
            assert err.value.under("data").where == "data.source"
            # train shard 0 reads only the first file: written, and kept (no manifest: the entry is not whole)
            entry = workdir / ".kdflow" / "soft_targets" / key
            assert (entry / "train" / "part-00000-of-00003.parquet").is_file(), key
            assert not (entry / "train" / "part-00002-of-00003.parquet").exists(), key
            assert not (entry / "manifest.json").exists(), key
    finally:
        warm.close()
