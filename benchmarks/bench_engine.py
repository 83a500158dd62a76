"""The precompute's engine on a Parquet source: kdflow's shard tasks against Ray Data and a plain loop.

One synthetic table (bench_scale.py's: 32 float32 features, 10 classes, 1M-row row groups), one teacher
(a seeded MLP 32-64-10, the scale workflow's), and three ways to get its float16 logits for every row:
  - plain loop: this process reads the table batch by batch (pyarrow, 65,536 rows), standardizes, runs the
    teacher under ``torch.no_grad()`` with torch's default threads, and keeps nothing: the floor the issue
    compares against ("a plain no_grad loop over the same rows", the read included, since the rows are
    on disk for every path);
  - kdflow: the `soft targets` stage's own call, ``SoftTargetStore.precompute`` over the data stage's
    ``SplitRows`` (train, val, test read by the tasks from the pieces, each piece's digest checked), 8
    train tasks, float16 logits written as bounded shard files + manifest to a fresh local folder;
  - kdflow precompute alone: the same, with the data stage's ``load_dataset`` (its own read of the source:
    counts, train mean/std, digests) done once before the timing, as a run's data stage is a stage of its own;
  - Ray Data: ``read_parquet`` -> ``map_batches`` on a pool of 2 long-lived actors (the teacher loaded once
    per actor, half a Ray CPU each so the read and write tasks can run beside them; standardize + forward) -> ``write_parquet`` of row ids and logits, to a fresh folder: the
    engine the issue names for step 3, with the least work the store would add (no split, no digests).
Rows/s is the table's rows / wall time of the call; Ray is started once, before any timing, and a small
first call of each Ray path is made and discarded, so that no path pays worker start-up. Each of
REPEATS rounds runs every path once, in turn; the table gives the median.

Run from the repository root: ``python benchmarks/bench_engine.py [--rows 2000000] [--repeats 3]``
(a markdown table on stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from bench_scale import CLASSES, FEATURES, log, work_table

BATCH = 65_536


HIDDEN = [64]  # the teacher's hidden layers (--hidden sets them)


def teacher(hidden: list[int]) -> torch.nn.Module:
    from tasks.kinds.classification.models import build_model

    torch.manual_seed(0)
    return build_model("mlp", {"hidden": hidden}, FEATURES, CLASSES).eval()


def plain_loop(path: Path, mean: np.ndarray, std: np.ndarray, model: torch.nn.Module) -> int:
    rows = 0
    cols = [f"f{i}" for i in range(FEATURES)]
    with torch.no_grad():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH, columns=cols):
            x = np.stack([batch.column(i).to_numpy() for i in range(FEATURES)], axis=1)
            x = (x - mean) / std
            model(torch.from_numpy(x.astype(np.float32))).to(torch.float16)
            rows += len(x)
    return rows


class Forward:
    """A Ray Data actor: the teacher built once, then standardize + forward for each batch."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: list[int]) -> None:
        torch.set_num_threads(1)
        self.model, self.mean, self.std = teacher(hidden), mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.stack([batch[f"f{i}"] for i in range(FEATURES)], axis=1)
        x = ((x - self.mean) / self.std).astype(np.float32)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x)).to(torch.float16).numpy()
        return {"label": batch["label"], "logits": list(logits)}


def ray_data(path: Path, mean: np.ndarray, std: np.ndarray, out: Path, limit: int | None = None) -> int:
    import ray

    ds = ray.data.read_parquet(str(path))
    if limit:
        ds = ds.limit(limit)
    # half a CPU each: with a whole one, the 2 actors take both CPUs of a 2-core Ray and the read and write
    # tasks never run (the pipeline hangs; ../the stack notes' Ray Train hang is the same thing)
    ds = ds.map_batches(Forward, fn_constructor_args=(mean, std, HIDDEN), batch_size=BATCH, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    ds.write_parquet(str(out))
    return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))


def kdflow(path: Path, out: Path, model: torch.nn.Module, data: object = None) -> int:
    """The data stage (`load_dataset`: one read of the source for counts, mean/std, digests) and the precompute;
    with `data`, a dataset loaded before, the precompute alone."""
    from tasks.kinds.classification.data import load_dataset
    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore

    data = data or load_dataset(str(path), label="label", val=0.05, test=0.05)
    rows = data.precompute_rows(0, from_source=True)
    store = SoftTargetStore(Storage(str(out)))
    from tasks.kinds import kind_for
    from tasks.store.precompute import Encoding, precompute

    m, _ = precompute(store, "bench", [model], rows, shards=8, width=CLASSES,
                      encoding=Encoding(kind_for("classification"), "logits", "float16", None, "mean_probs"),
                      meta={"num_classes": CLASSES, "num_features": FEATURES})
    return int(m["rows"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where the table goes (default: a temp dir)")
    ap.add_argument("--hidden", type=int, nargs="+", default=HIDDEN,
                    help="the teacher MLP's hidden layers (64: the scale workflow's; wider: a forward-bound teacher)")
    args = ap.parse_args()
    HIDDEN[:] = args.hidden
    work, path = work_table(args.work, args.rows, "kdflow-engine-")

    import ray

    from tasks.kinds.classification.data import load_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    d = load_dataset(str(path), label="label", val=0.05, test=0.05)
    mean, std = d.mean.astype(np.float32), d.std.astype(np.float32)
    model = teacher(HIDDEN)
    scratch = work / "out"

    def fresh() -> Path:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        return scratch

    log("warming the Ray paths")
    ray_data(path, mean, std, fresh(), limit=BATCH)
    kdflow(path, fresh(), model)
    paths: dict[str, Callable[[], int]] = {
        "plain no_grad loop (read + forward, 2 threads)": lambda: plain_loop(path, mean, std, model),
        "kdflow shard tasks (8 train tasks, bounded files)": lambda: kdflow(path, fresh(), model),
        "kdflow precompute alone (the data stage's load_dataset before the timing)":
            lambda: kdflow(path, fresh(), model, d),
        "Ray Data read -> map_batches (2 actors) -> write": lambda: ray_data(path, mean, std, fresh()),
    }
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            n = fn()
            s = time.perf_counter() - t0
            assert n == args.rows, (name, n)
            rates[name].append(n / s)
            log(f"round {r + 1}: {name}: {s:.1f} s, {n / s:,.0f} rows/s")
    floor = statistics.median(rates[next(iter(paths))])
    print(f"| path ({args.rows:,} rows, teacher 32-{'-'.join(map(str, HIDDEN))}-10, median of {args.repeats}) "
          "| rows/s | / plain loop |")
    print("| --- | ---: | ---: |")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):,.0f} | {statistics.median(rs) / floor:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
