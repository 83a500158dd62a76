"""tasks/evaluation.py: test-split metrics (streamed shard by shard, equal to the whole split's) and the
latency probe, which must leave the driver as it was."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks.evaluation import latency_ms, split_metrics, stream_metrics
from tasks.kinds.classification.models import build_model
from tasks.kinds.classification.report import teacher_test_accuracy


def test_latency_probe_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ms = latency_ms(build_model("mlp", {"hidden": [8]}, 4, 3), torch.zeros(1, 4), repeats=5)
        assert ms > 0
        assert torch.get_num_threads() == 2  # the probe runs on one thread, then puts the count back
    finally:
        torch.set_num_threads(before)


def test_streamed_test_metrics_equal_the_whole_split_ones_and_hold_one_shard_at_a_time(
        ray_session: None, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.kinds import kind_for
    from tasks.kinds.classification.data import load_dataset
    from tasks.storage import Storage
    from tasks.store import precompute as precompute_module
    from tasks.store.store import SPLITS, SoftTargetStore
    from tasks.train.step import evaluate
    from tests.helpers import precompute, quick_teacher

    monkeypatch.setattr(precompute_module, "SHARD_ROWS", 60)  # digits' 279 test rows in 5 shards; 2 train tasks' files
    data = load_dataset("sklearn:digits")
    task = kind_for("classification")
    storage = Storage(".kdflow")
    store = SoftTargetStore(storage)
    teacher_model = quick_teacher(data.x["train"], data.y["train"])
    manifest, _ = precompute(
        store, "digits-eval", [teacher_model], {s: (data.x[s], data.y[s]) for s in SPLITS},
        shards=2, format="topk", dtype="float16", top_k=3, ensemble="mean_probs", meta={"num_classes": 10,
                                                                                          "num_features": 64})
    torch.manual_seed(1)
    student = build_model("mlp", {"hidden": [8]}, 64, 10).eval()  # untrained: agreement and accuracy far from 1
    dims = task.dims(manifest)

    # the whole-split path of before: every test row in memory at once
    whole = store.read(manifest, "test")
    want = evaluate(task, student, whole, dims, torch.device("cpu"))
    want_teacher = float((task.decode_targets(whole.targets, dims).argmax(-1) == whole.y).float().mean())

    reads: list[tuple[int, int]] = []
    real_read = SoftTargetStore.read

    def recording(self: SoftTargetStore, m: dict, split: str, start: int = 0, stop: int | None = None,
                  verify: bool = True) -> Any:
        batch = real_read(self, m, split, start, stop, verify)
        reads.append((start, start + len(batch)))
        return batch

    monkeypatch.setattr(SoftTargetStore, "read", recording)
    got = stream_metrics(task, student, manifest, storage)
    teacher = teacher_test_accuracy(task, manifest, storage)
    shards = [(s["row_start"], s["row_stop"]) for s in manifest["splits"]["test"]["shards"]]
    train = [s["rows"] for s in manifest["splits"]["train"]["shards"]]
    assert max(train) <= 60 and len(train) == 2 * math.ceil(sum(train) / 2 / 60)  # 2 tasks, each cut in files
    assert len(shards) == 5 and reads == shards + shards  # two passes, one shard read at a time, each once
    assert got["accuracy"] == want["accuracy"] and got["agreement"] == want["agreement"]
    assert 0.02 < got["accuracy"] < 0.9 and 0.02 < got["agreement"] < 0.9
    assert teacher == pytest.approx(want_teacher, abs=1e-6) and teacher > 0.8

    # several models in one pass (the LM report: student, teacher, baseline): each shard read once, each
    # model's metrics those of the whole split; the one scored without targets has no agreement to report
    reads.clear()
    both = split_metrics(task, {"student": student, "teacher": teacher_model}, manifest, storage,
                         without_targets=("teacher",))
    assert reads == shards
    assert both["student"] == pytest.approx(want, rel=1e-5)
    bare = dataclasses.replace(whole, targets={})
    assert both["teacher"] == pytest.approx(evaluate(task, teacher_model, bare, dims, torch.device("cpu")), rel=1e-5)
    assert "agreement" in want and "agreement" not in both["teacher"]
