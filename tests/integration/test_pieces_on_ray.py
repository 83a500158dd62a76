"""A Parquet source read by Ray's workers from its pieces (tasks/pieces.py): the shards and the run they give
equal the driver's-arrays path's, each piece read once, a source changed mid-run the user's error."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import pieces
from tasks.dataset import Dataset
from tasks.errors import UserError
from tasks.kinds.classification.data import load_dataset
from tasks.pieces import Reader, SourceChanged, SplitRows
from tests.helpers import precompute
from tests.unit.test_pieces import FEATURES, SPLIT, source


def test_shard_tasks_reading_the_source_write_the_shards_the_drivers_arrays_give(
        ray_session: None, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tasks.storage import Storage
    from tasks.store import precompute as soft_targets
    from tasks.store.store import SPLITS, SoftTargetStore

    src = source(workdir, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})
    d = load_dataset(src, features=FEATURES, **SPLIT)
    torch.manual_seed(0)
    teacher = torch.nn.Linear(3, 3)
    store = SoftTargetStore(Storage(".kdflow"))
    args: dict = {"shards": 3, "format": "logits", "dtype": "float32", "top_k": None, "ensemble": "mean_probs",
                  "meta": {}}
    held, _ = precompute(store, "held", [teacher], {k: (d.x[k], d.y[k]) for k in SPLITS}, **args)
    rows = d.precompute_rows(SPLIT["seed"])
    assert all(isinstance(x, SplitRows) for x, _ in rows.values())  # no arrays go from the driver to the tasks
    read, stats = precompute(store, "read", [teacher], rows, **args)
    assert stats.forward_rows == 550
    assert [[e["sha256"] for e in read["splits"][s]["shards"]] for s in SPLITS] == \
        [[e["sha256"] for e in held["splits"][s]["shards"]] for s in SPLITS]

    # files bounded below a task's range: each task writes several, some across the two files' boundary
    monkeypatch.setattr(soft_targets, "SHARD_ROWS", 40)
    held, _ = precompute(store, "held-40", [teacher], {k: (d.x[k], d.y[k]) for k in SPLITS}, **args)
    read, _ = precompute(store, "read-40", [teacher], rows, **args)
    train = read["splits"]["train"]["shards"]
    assert max(e["rows"] for e in train) <= 40 and len(train) == 3 * math.ceil(len(d.y["train"]) / 3 / 40)
    sums = {m["key"]: [[e["sha256"] for e in m["splits"][s]["shards"]] for s in SPLITS] for m in (held, read)}
    assert sums["read-40"] == sums["held-40"]
    # a task killed after some of its files: the rerun computes only its missing ones, reading past the others
    entry = workdir / ".kdflow" / "soft_targets" / "read-40"
    (entry / "manifest.json").unlink()
    gone = train[1:3] + train[-1:]
    for e in gone:
        (entry / e["path"]).unlink()
    again, stats = precompute(store, "read-40", [teacher], rows, **args)
    assert stats.forward_rows == sum(e["rows"] for e in gone) and stats.computed_shards == len(gone)
    assert [[e["sha256"] for e in again["splits"][s]["shards"]] for s in SPLITS] == sums["held-40"]


def test_a_precompute_from_the_source_reads_each_piece_once_and_a_rerun_only_the_pieces_of_missing_files(
        ray_session: None, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard tasks read the source by units of whole pieces, every split from one read: each piece is
    opened once per precompute (it was once per split's task, and again by every task whose rows it held).
    Files that cross a unit's edge are joined from the units' parts, so every file is the arrays path's."""
    import torch

    from tasks.storage import Storage
    from tasks.store import precompute as soft_targets
    from tasks.store.precompute import units
    from tasks.store.store import SPLITS, SoftTargetStore

    src = source(workdir, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})  # 15 row groups
    d = load_dataset(src, features=FEATURES, **SPLIT)
    log = workdir / "reads.log"
    rows = {k: (dataclasses.replace(r, reader=LoggedReader(**vars(r.reader), log=str(log))),) * 2
            for k, (r, _) in d.precompute_rows(SPLIT["seed"]).items() if isinstance(r, SplitRows)}
    assert set(rows) == set(SPLITS)
    every_piece = [f"{p.name}|{p.row_group}" for p in rows["train"][0].pieces]
    torch.manual_seed(0)
    teacher = torch.nn.Linear(3, 3)
    store = SoftTargetStore(Storage(".kdflow"))
    args: dict = {"shards": 3, "format": "logits", "dtype": "float32", "top_k": None, "ensemble": "mean_probs",
                  "meta": {}}
    monkeypatch.setattr(soft_targets, "SHARD_ROWS", 40)
    held, _ = precompute(store, "held", [teacher], {k: (d.x[k], d.y[k]) for k in SPLITS}, **args)
    sums = [[e["sha256"] for e in held["splits"][s]["shards"]] for s in SPLITS]

    read, stats = precompute(store, "read", [teacher], rows, **args)
    assert sorted(log.read_text().split()) == sorted(every_piece)  # each piece once, none skipped
    assert stats.forward_rows == 550 and stats.computed_shards == sum(len(v) for v in sums)
    assert [[e["sha256"] for e in read["splits"][s]["shards"]] for s in SPLITS] == sums
    # three units of five pieces: files of every split cross their edges (so the joins above were needed)
    cuts = units({k: r for k, (r, _) in rows.items()}, 3)
    assert len(cuts) == 3
    for s in SPLITS:
        edges = {u[s][1] for u in cuts[:-1]}
        assert any(e["row_start"] < edge < e["row_stop"] for e in read["splits"][s]["shards"] for edge in edges), s

    # a killed run: a file inside a unit and one across an edge are missing; the rerun computes those two,
    # reading only the pieces that hold their rows, once each
    entry = workdir / ".kdflow" / "soft_targets" / "read"
    (entry / "manifest.json").unlink()
    train = read["splits"]["train"]["shards"]
    edge = cuts[0]["train"][1]
    crossing = next(e for e in train if e["row_start"] < edge < e["row_stop"])
    inside = train[-1]
    for e in (crossing, inside):
        (entry / e["path"]).unlink()
    log.unlink()
    again, stats = precompute(store, "read", [teacher], rows, **args)
    assert stats.computed_shards == 2 and stats.forward_rows == crossing["rows"] + inside["rows"]
    split_rows = rows["train"][0]
    wanted = {every_piece[i] for e in (crossing, inside) for i, _ in split_rows._overlaps(e["row_start"], e["row_stop"])}
    assert sorted(log.read_text().split()) == sorted(wanted)
    assert [[e["sha256"] for e in again["splits"][s]["shards"]] for s in SPLITS] == sums

    # more units than pieces (a cluster with more CPUs than the source has row groups): a piece is cut
    # between units, each reading it whole, and the files are still the arrays path's
    monkeypatch.setattr(soft_targets, "unit_count", lambda *a: 40)
    log.unlink()
    many, _ = precompute(store, "read-many", [teacher], rows, **args)
    assert [[e["sha256"] for e in many["splits"][s]["shards"]] for s in SPLITS] == sums
    reads = log.read_text().split()
    assert set(reads) == set(every_piece) and len(reads) == 40

    # one unit over every piece (as on a warm actor): val and test files finish between train files, and
    # each entry is still its own file's (a 20M-row run recorded one file's size and checksum for another)
    monkeypatch.setattr(soft_targets, "unit_count", lambda *a: 1)
    one, _ = precompute(store, "read-one", [teacher], rows, **args)
    assert [[e["sha256"] for e in one["splits"][s]["shards"]] for s in SPLITS] == sums
    assert len(one["splits"]["val"]["shards"]) > 1
    assert len(store.read(one, "val")) == one["splits"]["val"]["rows"]  # each file checked against its entry


def test_workers_read_a_local_source_only_while_the_cluster_is_on_this_machine(ray_session: None,
                                                                               workdir: Path) -> None:
    import ray

    from orchestrator.configs import machines, rows_for_teacher, workers_read_source
    from tasks.train.sources import SourceRows

    d = load_dataset(source(workdir, {"part-0.parquet": (0, 200)}), features=FEATURES, **SPLIT)
    assert machines(ray.nodes()) == 1 and workers_read_source(d)  # the session's one local node
    assert isinstance(rows_for_teacher(d)[0], SourceRows)
    assert not workers_read_source(load_dataset("sklearn:digits"))  # a built-in has only the driver's arrays
    # a second machine (another address) may not have the driver's path: the driver's arrays go instead
    node = next(n for n in ray.nodes() if n["Alive"])
    two = [node, {**node, "NodeID": "other", "NodeManagerAddress": "10.0.0.2"}]
    assert machines(two) == 2 and machines([*two[:1], {**two[1], "Alive": False}]) == 1
    assert machines([node, {**node, "NodeID": "second-node-same-host"}]) == 1  # two nodes, one disk
    arrays = d.precompute_rows(SPLIT["seed"], from_source=False)
    assert not any(isinstance(x, SplitRows) for x, _ in arrays.values())
    assert all(np.array_equal(arrays[k][0], d.x[k]) for k in ("train", "val", "test"))


@pytest.mark.slow
def test_a_run_whose_workers_read_the_source_never_fills_the_drivers_arrays_and_ends_as_the_arrays_path(
        ray_session: None, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run in this process on a Parquet source: the driver's Dataset holds metadata only (`fill`, counted
    where the Dataset calls it, never runs); the same run made to take the driver's arrays (as on a cluster of
    several machines) fills them and writes the same soft targets and the same student."""
    from orchestrator import configs, stages
    from orchestrator.pipeline import run_workflow
    from orchestrator.spec import validate
    from tasks.kinds.classification import data as data_module
    from tasks.storage import Storage
    from tasks.store.store import SPLITS, SoftTargetStore
    from tests.helpers import workflow

    src = source(workdir, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})
    fills: list[int] = []
    real_fill = data_module.fill
    monkeypatch.setattr(data_module, "fill", lambda *a, **k: fills.append(1) or real_fill(*a, **k))
    loaded: list[Dataset] = []
    real_load = stages.load_data
    monkeypatch.setattr(stages, "load_data", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")

    def run(root: str) -> dict:
        spec = workflow(**{"storage.root": root, "data.source": src, "data.features": FEATURES,
                           "data.label": "label", "data.split": {"val": SPLIT["val"], "test": SPLIT["test"]},
                           "seed": SPLIT["seed"], "teacher.train.epochs": 3})
        return run_workflow(validate(spec))

    read = run("store-read")
    assert fills == [] and not loaded[-1].filled and loaded[-1].arrays is None
    assert loaded[-1].rows("train") + loaded[-1].rows("val") + loaded[-1].rows("test") == 550

    monkeypatch.setattr(configs, "workers_read_source", lambda data: False)
    monkeypatch.setattr(stages, "workers_read_source", lambda data: False)
    arrays = run("store-arrays")
    assert fills and loaded[-1].filled  # the arrays path is really the other path

    def shards(root: str, result: dict) -> list[list[str]]:
        m = SoftTargetStore(Storage(root)).manifest(result["soft_targets"]["cache_key"])
        return [[e["sha256"] for e in m["splits"][s]["shards"]] for s in SPLITS]

    assert read["soft_targets"]["cache_key"] == arrays["soft_targets"]["cache_key"]
    assert shards("store-read", read) == shards("store-arrays", arrays)
    for k in ("test_accuracy", "teacher_agreement", "num_params"):
        assert read["student"][k] == arrays["student"][k], k
    assert read["teacher"]["test_accuracy"] == arrays["teacher"]["test_accuracy"]


def test_a_source_changed_after_the_data_stage_is_still_the_users_error_naming_the_source(
        ray_session: None, workdir: Path) -> None:
    """With no fill in the data stage, a file changed after the reduction is found by whoever reads it next: the
    shard tasks (a `SourceChanged`, exit 2, not a failed shard) or a late fill of the arrays (named under the
    workflow's section)."""
    import torch

    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore

    src = source(workdir, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})
    d = load_dataset(src, features=FEATURES, **SPLIT)
    assert not d.filled
    t = pq.read_table(workdir / "part-1.parquet")
    f0 = t.column("f0").to_numpy().copy()
    f0[10] += 1.0
    pq.write_table(t.set_column(1, "f0", pa.array(f0)), workdir / "part-1.parquet", row_group_size=37)
    torch.manual_seed(0)
    with pytest.raises(SourceChanged) as err:
        precompute(SoftTargetStore(Storage(".kdflow")), "changed", [torch.nn.Linear(3, 3)], d.precompute_rows(SPLIT["seed"]), shards=3, format="logits",
            dtype="float32", top_k=None, ensemble="mean_probs", max_retries=0, meta={})
    assert err.value.where == "source" and "part-1.parquet (row group 0) changed while this run read it" in str(err.value)
    d.where = "data"
    with pytest.raises(UserError) as late:
        d.x  # noqa: B018 - the late fill
    assert late.value.where == "data.source" and "changed while this run read it" in str(late.value)
    assert not d.filled


@dataclasses.dataclass
class LoggedReader(Reader):
    """A reader that appends "<file>|<row group>" to `log` for every piece it opens (in any process)."""

    log: str = ""

    def chunks(self, piece: pieces.Piece) -> Any:
        with open(self.log, "a") as f:
            f.write(f"{piece.name}|{piece.row_group}\n")
        yield from super().chunks(piece)
