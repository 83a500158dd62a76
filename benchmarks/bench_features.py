"""Should soft-target shards repeat the source's features? (issue 13, step 6)

Two designs for what a train worker reads to get its share (features, labels, teacher targets):
  - "features in shards" (today): each shard holds row ids, the standardized features, labels and the
    teacher's outputs; a worker reads its shards and nothing else.
  - "features from source": shards hold row ids, labels and the teacher's outputs only; a worker reads its
    rows' features from the source by row range (`tasks.pieces.SplitRows.rows`: every piece that holds some
    of them, checked against the reduction's digests, standardized on the fly) beside its shards. Measured at
    its best: each piece read once for the whole split.

For one synthetic table (bench_scale's: 32 float32 features, 10 classes, 1M-row row groups) it splits and
reduces the source as `kdflow run` does, cuts the train split into `--shards` shards, and writes each shard
both ways (float16 logits of a fixed linear teacher, zstd, the store's own `encode_rows`) to local files.
Then, in alternating rounds, it reads the whole train split both ways the way a worker does (bytes read,
sha256 checked as the store does, decoded to tensors), and reports per design: stored bytes per row, shard
encode time, and read throughput (median over rounds). The source and the shards are in the page cache
after the first round, so this measures decode and check work, not the disk.

Run from the repository root: ``python benchmarks/bench_features.py [--rows 2000000] [--repeats 3]``
(a markdown table on stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import CLASSES, FEATURES, log, work_table

from tasks.kinds.classification.data import load_dataset
from tasks.store.shards import _load_array, _store_array, decode_rows, encode_rows
from tasks.store.store import shard_ranges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="where the table and shards go (default: a temp dir)")
    args = ap.parse_args()
    work, table = work_table(args.work, args.rows, "kdflow-features-")
    data = load_dataset(str(table), label="label", val=0.05, test=0.05)
    train = data.source_rows["train"]
    n = len(train)
    log(f"{args.rows:,} rows, train split {n:,}, {args.shards} shards; work dir {work}")

    torch.manual_seed(0)  # the same teacher every run
    teacher = torch.nn.Linear(FEATURES, CLASSES)
    ranges = shard_ranges(n, args.shards)
    encode_s = {"with": 0.0, "without": 0.0}
    for i, (a, b) in enumerate(ranges):
        x, y = train.rows(a, b)
        with torch.no_grad():
            logits = teacher(torch.from_numpy(x))
        t0 = time.perf_counter()
        full = encode_rows(np.arange(a, b), x, y, logits, "logits", "float16", None)
        encode_s["with"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        # the same shard less its features column, written as `encode_rows` writes its columns (zstd)
        buf = io.BytesIO()
        pq.write_table(pa.table({"row_id": pa.array(np.arange(a, b), type=pa.int64()),
                                 "label": pa.array(y, type=pa.int64()), "logits": _store_array(logits, "float16")}),
                       buf, compression="zstd")
        slim = buf.getvalue()
        encode_s["without"] += time.perf_counter() - t0
        (work / f"with-{i}.parquet").write_bytes(full)
        (work / f"without-{i}.parquet").write_bytes(slim)
    sizes = {k: sum((work / f"{k}-{i}.parquet").stat().st_size for i in range(len(ranges))) for k in encode_s}

    def read_with() -> int:
        rows = 0
        for i in range(len(ranges)):
            data = (work / f"with-{i}.parquet").read_bytes()
            hashlib.sha256(data).hexdigest()
            rows += len(decode_rows(data, "float16"))
        return rows

    def read_without() -> int:
        for i in range(len(ranges)):
            data = (work / f"without-{i}.parquet").read_bytes()
            hashlib.sha256(data).hexdigest()
            t = pq.read_table(io.BytesIO(data), columns=["row_id", "label", "logits"])
            _load_array(t.column("logits"), "float16")
            torch.from_numpy(np.array(t.column("label").to_numpy(), copy=True))
        # the features from the source's pieces (digest-checked, standardized), each piece read once: the
        # best case for this design (a worker whose share is cut at shard bounds re-reads a piece per shard)
        return sum(len(torch.from_numpy(train.rows(a, b)[0])) for a, b in train.ranges(0, n))

    times: dict[str, list[float]] = {"with": [], "without": []}
    for r in range(args.repeats + 1):  # round 0 warms the page cache and is not counted
        for name, fn in (("with", read_with), ("without", read_without)):
            t0 = time.perf_counter()
            got = fn()
            if r:
                times[name].append(time.perf_counter() - t0)
            assert got == n, (name, got, n)
        log(f"  round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v and r))

    base = statistics.median(times["with"])
    print(f"{args.rows:,} rows ({n:,} train rows in {len(ranges)} shards), {args.repeats} rounds, "
          f"load average at the end {tuple(round(v, 1) for v in os.getloadavg())}\n")
    print("| design | stored bytes/row | shard encode s | read the train split s (median) | rows/s | read vs today |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label in (("with", "features in shards (today)"), ("without", "features from source")):
        med = statistics.median(times[name])
        print(f"| {label} | {sizes[name] / n:.1f} | {encode_s[name]:.2f} | {med:.2f} | {n / med:,.0f} | "
              f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
