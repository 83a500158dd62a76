"""A label-sorted Parquet source, distilled with the student's share held, streamed one shard at a time,
and streamed a window of shards at a time: what the streamed window is for.

The hash split keeps a source's row order (tasks/pieces.py), so a table sorted by label gives soft-target
shards of one or two classes. A worker that streams its share one shard at a time then trains on batches
of one class; a window of shards shuffled together (tasks/train/stream.py) does not. Prints a table on stdout:

    .venv/bin/python benchmarks/bench_sorted.py [--shards 32] [--epochs 6] [--window 4 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.configs import student_fit_config
from orchestrator.spec import validate
from tasks.kinds import kind_for
from tasks.kinds.classification.data import load_dataset
from tasks.storage import Storage
from tasks.store.precompute import Encoding, precompute
from tasks.store.store import SoftTargetStore
from tasks.train.sources import ShardSource
from tasks.train.stream import streamed
from tasks.train.warm import fit_here


def teacher(x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    from tasks.kinds.classification.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [64]}, x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--window", type=int, nargs="+", default=[4], help="shards a window holds, one run each")
    args = ap.parse_args()
    import ray
    from sklearn.datasets import load_digits

    work = Path(tempfile.mkdtemp(prefix="kdflow-sorted-"))
    d = load_digits()
    order = np.argsort(d.target, kind="stable")  # sorted by label, as an export per class would be
    pq.write_table(pa.table({**{f"p{i}": d.data[order, i].astype(np.float32) for i in range(64)},
                             "label": d.target[order]}), work / "sorted.parquet")
    data = load_dataset(str(work / "sorted.parquet"), label="label")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    storage = Storage(str(work / "store"))
    manifest, _ = precompute(
        SoftTargetStore(storage), "sorted", [teacher(data.x["train"], data.y["train"])], data.precompute_rows(0),
        shards=args.shards, encoding=Encoding(kind_for("classification"), "logits", "float16", None, "mean_probs"),
        width=data.num_classes, meta={"num_classes": data.num_classes, "num_features": data.num_features})
    spec = validate({"name": "sorted", "data": {"source": str(work / "sorted.parquet")},
                                    "teacher": {"model": "mlp"}, "student": {"model": "mlp", "params": {"hidden": [32]}},
                                    "train": {"epochs": args.epochs}})
    base = student_fit_config(spec, manifest, storage, epoch_hook=None)
    train = ShardSource(storage, manifest, "train")
    pieces = train.blocks(0, train.rows())
    largest = max(train.stored_bytes(a, b) for a, b in pieces)
    classes = [len(np.unique(data.y["train"][a:b])) for a, b in pieces]
    print(f"{train.rows()} train rows in {len(pieces)} shards; classes per shard: min {min(classes)}, "
          f"max {max(classes)}", file=sys.stderr)
    runs = [("held", base.hold_share_bytes), ("streamed, 1 shard at a time", 0),
            *[(f"streamed, {w} shards at a time", 4 * largest * w) for w in args.window]]
    if len(pieces) <= 4 * max(args.window):
        sys.exit(f"--window {max(args.window)} needs more than {4 * max(args.window)} shards to stream (a window "
                 "is a quarter of the budget); raise --shards")
    print("| share | window (shards) | val accuracy | val agreement with teacher |")
    print("| --- | ---: | ---: | ---: |")
    for name, hold in runs:
        share = streamed(train, 0, train.rows(), hold)  # the single worker's share: all of train
        window = "all (held)" if share is None else share.window
        result = fit_here(replace(base, hold_share_bytes=hold), storage=storage, run_name=name)
        last = result.history[-1]
        print(f"| {name} | {window} | {last['val_accuracy']:.3f} | {last['val_agreement']:.3f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
