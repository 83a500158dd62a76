"""Fits whose shares stream (tasks/train/stream.py) on the session's Ray: shard by shard, learning like a held
share; a teacher reading a Parquet source's pieces trains as on the driver's arrays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.configs import student_fit_config, teacher_fit_config
from orchestrator.spec import validate
from tasks.kinds.classification.data import load_dataset
from tasks.storage import Storage
from tasks.store.shards import TargetBatch
from tasks.store.store import SoftTargetStore
from tasks.train.sources import ArraySource, ShardSource, SourceRows
from tasks.train.warm import fit_here, with_cache
from tests.helpers import precompute, quick_teacher, workflow


def test_a_streamed_fit_reads_shard_by_shard_and_learns_like_a_held_one(ray_session: None, tmp_path: Path) -> None:
    data = load_dataset("sklearn:digits")
    storage = Storage(str(tmp_path))
    manifest, _ = precompute(SoftTargetStore(storage), "digits-stream", [quick_teacher(data.x["train"], data.y["train"])],
        {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}, shards=4, format="topk", dtype="float16",
        top_k=3, ensemble="mean_probs", meta={"num_classes": data.num_classes, "num_features": data.num_features})
    spec = validate(workflow(**{"train.epochs": 4, "student.params": {"hidden": [32]}}))
    base = student_fit_config(spec, manifest, storage, epoch_hook=None)
    runs = {}
    for name, hold in (("held", base.hold_share_bytes), ("streamed", 0)):
        train, val = RecordingShards(storage, manifest, "train"), RecordingShards(storage, manifest, "val")
        result = fit_here(replace(base, data=train, val=val, hold_share_bytes=hold), storage=storage,
                          run_name=f"stream-{name}")
        runs[name] = (result, train.loads, val.loads)
    shards = [(s["row_start"], s["row_stop"]) for s in manifest["splits"]["train"]["shards"]]
    held, streamed = runs["held"], runs["streamed"]
    assert held[1] == [(0, manifest["splits"]["train"]["rows"])]  # held: one read of the whole share
    assert sorted(streamed[1]) == sorted(shards * 4)  # streamed: every shard once per epoch, nothing more
    assert streamed[2] == [(0, manifest["splits"]["val"]["rows"])]  # one val shard: nothing to gain, held
    for result, _, _ in (held, streamed):
        last = result.history[-1]
        assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
        assert last["val_accuracy"] >= 0.8 and last["val_agreement"] >= 0.8
    assert abs(held[0].history[-1]["val_accuracy"] - streamed[0].history[-1]["val_accuracy"]) < 0.1


def test_a_teacher_on_a_parquet_source_reads_its_pieces_and_trains_as_on_the_drivers_arrays(
        ray_session: None, tmp_path: Path) -> None:
    import ray

    from tests.unit.test_pieces import FEATURES, SPLIT, source

    spec = validate(workflow(**{"teacher.train.epochs": 3, "teacher.train.batch_size": 32}))
    assert isinstance(teacher_fit_config(spec, spec.teachers[0], load_dataset("sklearn:digits")).data, ArraySource)
    # two files of 37-row row groups: 15 pieces, each split's rows of a piece one block
    data = load_dataset(source(tmp_path, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)}),
                        features=FEATURES, **SPLIT)
    cfg = teacher_fit_config(spec, spec.teachers[0], data)
    assert isinstance(cfg.data, SourceRows) and isinstance(cfg.val, SourceRows)  # nothing put by the driver
    storage = Storage(str(tmp_path / "store"))
    cache: dict[Any, Any] = {}
    from_source = fit_here(with_cache(cfg, cache), storage=storage, run_name="teacher-source")
    assert cache == {}  # a warm process keeps no teacher rows: no entry another dataset could read
    arrays = replace(cfg, data=ArraySource(ray.put(data.x["train"]), ray.put(data.y["train"])),
                     val=ArraySource(ray.put(data.x["val"]), ray.put(data.y["val"])))
    from_arrays = fit_here(arrays, storage=storage, run_name="teacher-arrays")
    # the same rows in the same order, seed and threads: bitwise the same weights and metrics
    assert from_source.state_dict.keys() == from_arrays.state_dict.keys()
    for k, w in from_source.state_dict.items():
        assert torch.equal(w, from_arrays.state_dict[k]), k
    def learned(history: list[dict[str, float]]) -> list[dict[str, float]]:  # not the timings
        return [{k: v for k, v in h.items() if k.startswith(("epoch", "train_", "val_")) and k != "epoch_s"}
                for h in history]

    assert learned(from_source.history) == learned(from_arrays.history) and len(from_source.history) == 3
    assert "val_accuracy" in from_source.history[-1]

    # over the budget, a worker reads its share piece by piece: every block once an epoch, nothing else
    train, val = RecordingSourceRows(cfg.data), RecordingSourceRows(cfg.val)
    streamed = fit_here(replace(cfg, data=train, val=val, hold_share_bytes=0), storage=storage,
                        run_name="teacher-streamed")
    assert len(streamed.history) == 3
    for rows, n in ((train, data.rows("train")), (val, data.rows("val"))):
        blocks = rows.blocks(0, n)
        assert len(blocks) > 5 and sorted(rows.loads) == sorted(blocks * 3)


class RecordingShards(ShardSource):
    """The store's own reader, recording the ranges a fit asks it for."""

    def __init__(self, storage: Storage, manifest: dict[str, Any], split: str) -> None:
        super().__init__(storage, manifest, split)
        self.loads: list[tuple[int, int]] = []

    def load(self, start: int, stop: int) -> TargetBatch:
        self.loads.append((start, stop))
        return super().load(start, stop)


class RecordingSourceRows(SourceRows):
    def __init__(self, rows: SourceRows) -> None:
        super().__init__(rows.split)
        self.loads: list[tuple[int, int]] = []

    def load(self, start: int, stop: int) -> TargetBatch:
        self.loads.append((start, stop))
        return super().load(start, stop)

    def chunks(self, start: int, stop: int) -> Any:
        self.loads.append((start, stop))
        return super().chunks(start, stop)
