"""How a `kdflow run` scales with the rows of a Parquet source: peak memory, stage times, bytes per row.

For each size it writes a synthetic table (32 float32 features, 10 classes from a fixed random linear
rule, 1M-row Parquet row groups) to local disk, then runs one `kdflow run` on it in a fresh process
with its own local Ray and a fresh store: a 32-64-10 MLP teacher trained by the workflow for one epoch,
soft targets as float16 logits in 8 shards, a 16-unit student for one epoch, registered to a local
MLflow store.

Measured, from the operating system, not from kdflow:
  - driver peak RSS: the `kdflow run` process's VmHWM (/proc/PID/status), read just before it exits;
  - worker peak RSS: the largest VmHWM of any train worker process (Ray Train's RayTrainWorker or a warm
    TrialWorker) descended from the run's process (its local Ray), polled every 0.2 s while the run lasts (a process's VmHWM only grows, so the poll
    misses nothing but a worker that starts and ends between two polls);
  - the driver's peak by stage: its VmRSS at each poll, charged to the stage whose "▶" line its stderr
    showed last (where the driver's high-water mark is reached, not only how high it is);
  - stage seconds from the run's result JSON, bytes per row from its soft-target manifest.

Run from the repository root: ``python benchmarks/bench_scale.py [--rows 200000 2000000 ...]``; with
``--data-only``, only the data stage (`load_dataset` in a fresh process, its VmHWM read just before it exits:
for a Parquet source the reduction pass alone, since the split arrays are filled only when a stage asks)
(a markdown table on stdout, progress on stderr; 20M rows needs about 20 GB free for today's path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
FEATURES, CLASSES, ROW_GROUP = 32, 10, 1_000_000
WORKER_TITLES = ("RayTrainWorker", "TrialWorker")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_table(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` rows of FEATURES float32 columns and an int label, written one row group at a time."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    names = [f"f{i}" for i in range(FEATURES)]
    schema = pa.schema([(n, pa.float32()) for n in names] + [("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            x = rng.normal(size=(n, FEATURES)).astype(np.float32)
            y = np.argmax(x @ w + rng.normal(scale=0.5, size=(n, CLASSES)), axis=1)
            cols = [pa.array(x[:, i]) for i in range(FEATURES)] + [pa.array(y.astype(np.int64))]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=ROW_GROUP)


def work_table(work: Path | None, rows: int, prefix: str) -> tuple[Path, Path]:
    """The work folder (a fresh temp one when None) and the synthetic table of `rows` rows in it, written
    unless it is already there."""
    work = work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    table = work / f"table-{rows}.parquet"
    if not table.exists():
        log(f"writing {rows:,} rows to {table}")
        write_table(table, rows)
    return work, table


WORKFLOW = """\
name: scale-{rows}
seed: 0
storage: {{root: {root}}}
tracking: {{uri: null, experiment: scale}}
data: {{source: {source}, label: label, split: {{val: 0.05, test: 0.05}}}}
teacher:
  model: mlp
  params: {{hidden: [64]}}
  train: {{epochs: 1, batch_size: 1024, lr: 0.003}}
soft_targets: {{shards: 8, format: logits, dtype: float16}}
student: {{model: mlp, params: {{hidden: [16]}}}}
distill: {{loss: kl, temperature: 2.0, alpha: 0.5}}
train: {{epochs: 1, batch_size: 1024, workers: 1, optimizer: {{name: adamw, lr: 0.003}}, hold_share_mb: {hold}}}
registry: {{model: scale-student}}
"""


def vm_hwm(pid: int) -> int | None:
    """Peak resident set of a live process, bytes (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def vm_rss(pid: int) -> int:
    """Resident set of a live process now, bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return 0


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def worker_pids(root: int) -> list[int]:
    """Train worker processes descended from `root` (the run's own local Ray starts under it), so other
    Ray sessions' workers on the same machine are not counted."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(t in cmd for t in WORKER_TITLES):
            pid = int(p.name)
            while pid > 1 and pid != root:
                pid = parent(pid)
            if pid == root:
                out.append(int(p.name))
    return out


def run_once(rows: int, work: Path, hold_mb: float) -> dict[str, Any]:
    source = work / f"table-{rows}.parquet"
    if not source.exists():
        t0 = time.perf_counter()
        write_table(source, rows)
        log(f"  wrote {rows:,} rows ({source.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s")
    root = work / f"store-{rows}"
    shutil.rmtree(root, ignore_errors=True)
    wf = work / f"scale-{rows}.yaml"
    wf.write_text(WORKFLOW.format(rows=rows, root=root, source=source, hold=hold_mb))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    out, err = work / f"result-{rows}.json", work / f"stderr-{rows}.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([str(ROOT / ".venv/bin/kdflow"), "run", "--json", str(wf)], cwd=ROOT, env=env,
                                stdout=stdout, stderr=stderr)
        driver_peak = 0
        workers: dict[int, int] = {}  # pid -> peak, in the order the workers appeared
        by_stage: dict[str, int] = {}  # stage -> the driver's largest RSS seen while it was the last begun
        stage, seen = "start", 0
        t0 = time.perf_counter()
        while proc.poll() is None:
            driver_peak = max(driver_peak, vm_hwm(proc.pid) or 0)
            text = err.read_text(errors="replace")
            for line in text[seen:].splitlines():
                if line.startswith("▶ "):
                    stage = line[2:].split()[0]
            seen = len(text)
            by_stage[stage] = max(by_stage.get(stage, 0), vm_rss(proc.pid))
            for pid in worker_pids(proc.pid):
                workers[pid] = max(workers.get(pid, 0), vm_hwm(pid) or 0)
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kdflow run on {rows} rows exited {proc.returncode}; see {err}")
    result = json.loads(out.read_text())
    stages = result.get("stages", {})
    st = result["soft_targets"]
    peaks = list(workers.values())
    # without warm stages the teacher's and the student's Ray Train workers are two processes, in that order
    return {"rows": rows, "wall_s": wall, "driver_gb": driver_peak / 1e9, "worker_gb": max(peaks) / 1e9,
            "last_worker_gb": peaks[-1] / 1e9, "driver_by_stage": {k: round(v / 1e9, 3) for k, v in by_stage.items()},
            **{f"{k}_s": float(v) for k, v in stages.items()},
            "bytes_per_row": st["bytes"] / st["rows"] if st.get("rows") else float("nan")}


DATA_STAGE = """\
import sys, time
from pathlib import Path
from tasks.kinds.classification.data import load_dataset
t0 = time.perf_counter()
d = load_dataset(sys.argv[1], label="label", val=0.05, test=0.05)
seconds = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
           if line.startswith("VmHWM:"))
print(hwm * 1024, seconds, sum(d.counts.values()))
"""


def data_stage(rows: int, work: Path) -> dict[str, Any]:
    """The data stage alone (`load_dataset`, as `kdflow run` calls it) in a fresh process: its peak RSS is
    the driver's while it reads the source, before Ray or any later stage adds to it."""
    source = work / f"table-{rows}.parquet"
    if not source.exists():
        write_table(source, rows)
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", DATA_STAGE, str(source)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return {"rows": rows, "data_gb": int(out[0]) / 1e9, "data_s": float(out[1]), "loaded": int(out[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--work", type=Path, default=None, help="where tables and stores go (default: a temp dir)")
    ap.add_argument("--hold-share-mb", type=float, nargs="+", default=[1024.0],
                    help="train.hold_share_mb per round (0 makes the train workers stream their share); with "
                         "several, each size runs once per value, side by side")
    ap.add_argument("--data-only", action="store_true",
                    help="measure the data stage alone (load_dataset in a fresh process), not a whole run")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}; load average {os.getloadavg()}")
    if args.data_only:
        found = [data_stage(rows, work) for rows in args.rows]
        print(f"load average at the end: {os.getloadavg()}\n")
        print("| rows | data stage peak RSS | data s |\n| ---: | ---: | ---: |")
        for r in found:
            ratio = "" if r is found[0] else f" ({r['data_gb'] / found[0]['data_gb']:.1f}x)"
            print(f"| {r['rows']:,} | {r['data_gb']:.2f} GB{ratio} | {r['data_s']:.1f} |")
        return
    results = []
    for rows in args.rows:
        for hold in args.hold_share_mb:
            log(f"{rows:,} rows, train.hold_share_mb {hold:g}")
            r = {"hold_share_mb": hold, **run_once(rows, work, hold)}
            log(f"  {json.dumps({k: v if isinstance(v, dict) else round(v, 3) for k, v in r.items()})}")
            results.append(r)
    stages = [k for k in results[0] if k.endswith("_s") and k != "wall_s"]
    print(f"load average at the end: {os.getloadavg()}\n")
    print("| rows | hold_share_mb | driver peak RSS | worker peak RSS | last worker | "
          + " | ".join(f"{s[:-2]} s" for s in stages) + " | wall | bytes/row |")
    print("| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in stages) + " | ---: | ---: |")
    for r in results:
        base = next(b for b in results if b["hold_share_mb"] == r["hold_share_mb"])

        def gb(key: str, r: dict[str, Any] = r, base: dict[str, Any] = base) -> str:
            return f"{r[key]:.2f} GB" + ("" if r is base else f" ({r[key] / base[key]:.1f}x)")

        print(f"| {r['rows']:,} | {r['hold_share_mb']:g} | {gb('driver_gb')} | {gb('worker_gb')} | "
              f"{gb('last_worker_gb')} | " + " | ".join(f"{r.get(s, float('nan')):.1f}" for s in stages)
              + f" | {r['wall_s']:.0f} s | {r['bytes_per_row']:.0f} |")
    print("\nThe driver's largest RSS while each stage was the last begun (GB):\n")
    names = list(dict.fromkeys(k for r in results for k in r["driver_by_stage"]))
    print("| rows | hold_share_mb | " + " | ".join(names) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for r in results:
        print(f"| {r['rows']:,} | {r['hold_share_mb']:g} | "
              + " | ".join(f"{r['driver_by_stage'].get(n, float('nan')):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
