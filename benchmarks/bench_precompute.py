"""Soft-target precompute throughput: the Ray-task path against a plain in-process loop.

The same teacher and the same rows go through
  - a plain ``torch.no_grad()`` loop in this process (batches of 4096, torch's default threads, then 1),
  - the same loop plus what the store adds per shard (Parquet encode + zstd + atomic write), in-process,
  - ``SoftTargetStore.precompute``: one Ray task per shard, at most W tasks at once (W = 1, 2), each task
    with 1 torch thread, writing Parquet shards and the manifest to a local folder.
Rows/s is rows / wall time of the whole call; the Ray columns include ray.put of the rows, scheduling,
the shard writes and the manifest, on a Ray that is already started with warm workers (a first call is
made and discarded). Each of REPEATS rounds runs every path once, in turn, so that a change in the
machine's load hits all paths alike; the table gives the median per path.

Run from the repository root: ``python benchmarks/bench_precompute.py [--rows N] [--repeats R]``
(a markdown table on stdout, progress on stderr; ~2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.kinds import kind_for
from tasks.kinds.classification.models import build_model
from tasks.models import num_params, teacher_forward
from tasks.storage import Storage
from tasks.store.precompute import Encoding, precompute
from tasks.store.shards import encode_rows
from tasks.store.store import SPLITS, SoftTargetStore, shard_name, shard_ranges

TEACHERS = {
    "cnn1d 28k (mnist1d-transfer teacher)": ("cnn1d", {"channels": [36, 36, 36], "kernel_size": 5, "stride": 1}),
    "mlp 40-256-256-10": ("mlp", {"hidden": [256, 256]}),
}
FEATURES, CLASSES, SHARDS = 40, 10, 8
CLASSIFICATION = kind_for("classification")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_time(repeats: int, fn: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_loop(teacher: torch.nn.Module, x: np.ndarray, batch: int = 4096) -> None:
    with torch.no_grad():
        for i in range(0, len(x), batch):
            teacher(torch.from_numpy(x[i:i + batch]))


def plain_loop_with_writes(teacher: torch.nn.Module, x: np.ndarray, y: np.ndarray, folder: str) -> None:
    storage = Storage(folder)
    for i, (a, b) in enumerate(shard_ranges(len(y), SHARDS)):
        logits = teacher_forward([teacher], x[a:b], "mean_probs", batch=4096)
        storage.write_bytes(storage.path(shard_name("train", i, SHARDS)),
                            encode_rows(np.arange(a, b), x[a:b], y[a:b], logits, "logits", "float16", None))
    shutil.rmtree(folder, ignore_errors=True)


def ray_path(teacher: torch.nn.Module, x: np.ndarray, y: np.ndarray, folder: str, workers: int) -> dict:
    empty = (np.zeros((0, FEATURES), np.float32), np.zeros(0, np.int64))
    splits = {s: empty for s in SPLITS} | {"train": (x, y)}
    out, _ = precompute(SoftTargetStore(Storage(folder)), "bench", [teacher], splits, shards=SHARDS,
                        encoding=Encoding(CLASSIFICATION, "logits", "float16", None, "mean_probs"), width=CLASSES,
                        meta={}, workers=workers)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import ray

    from orchestrator.runtime import ensure_ray

    ensure_ray()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, FEATURES)).astype(np.float32)  # standardized features, as the store sees them
    y = rng.integers(0, CLASSES, args.rows)
    tmp = tempfile.mkdtemp(prefix="bench-precompute-")
    default_threads = torch.get_num_threads()
    base = f"plain loop ({default_threads} threads)"
    loads = [os.getloadavg()[0]]
    rows = []
    for name, (family, params) in TEACHERS.items():
        torch.manual_seed(0)
        teacher = build_model(family, params, FEATURES, CLASSES).eval()
        log(f"{name}: {num_params(teacher)} params, {args.rows} rows")
        paths: dict[str, tuple[int, Callable[..., object], tuple[object, ...]]] = {
            base: (default_threads, plain_loop, (teacher, x)),
            "plain loop (1 thread)": (1, plain_loop, (teacher, x)),
            "plain loop + shard writes (1 thread)": (
                1, plain_loop_with_writes, (teacher, x, y, os.path.join(tmp, "plain"))),
            **{f"Ray tasks, {w} worker(s)": (default_threads, ray_path, (teacher, x, y, os.path.join(tmp, "ray"), w))
               for w in (1, 2)},
        }
        for w in (1, 2):
            ray_path(teacher, x, y, os.path.join(tmp, "warm"), w)  # start and warm the workers
        # rounds that take each path in turn, so a change in the machine's load hits every path alike
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.repeats):
            for label, (threads, fn, fn_args) in paths.items():
                torch.set_num_threads(threads)
                times[label].append(median_time(1, fn, *fn_args))
        torch.set_num_threads(default_threads)
        result = {"teacher": name, "params": num_params(teacher),
                  **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(result)
        loads.append(os.getloadavg()[0])
        log(json.dumps(result))
    shutil.rmtree(tmp, ignore_errors=True)
    ray.shutdown()

    columns = list(paths)
    print(f"rows: {args.rows}, shards: {SHARDS}, repeats: {args.repeats} (median), cpus: {os.cpu_count()}, "
          f"1-min load average at start/after each teacher: {' / '.join(f'{v:.1f}' for v in loads)}\n")
    single = "plain loop (1 thread)"
    print(f"| teacher | params | path | rows/s | / {base} | / {single} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for c in columns:
            print(f"| {r['teacher']} | {r['params']:,} | {c} | {args.rows / r[c]:,.0f} | {r[base] / r[c]:.2f} "
                  f"| {r[single] / r[c]:.2f} |")


if __name__ == "__main__":
    main()
