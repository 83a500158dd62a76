"""One student worker's peak memory over an existing soft-target entry, in this process (no Ray Train run).

bench_scale.py measures whole runs; this isolates the streamed worker so its window can be tuned in
seconds per change instead of a 7-minute run: it loads the entry's manifest, builds the scale workflow's
student fit (`orchestrator.configs.student_fit_config`) and runs it here (`tasks.warm.fit_here`, the path a
single-worker CPU fit takes on its warm actor), then prints this process's VmHWM and the fit's peak RSS per
epoch (growth from one epoch to the next is memory the allocator kept).

Run from the repository root, on a store bench_scale.py left (its `--work`):
``python benchmarks/bench_worker.py STORE_ROOT [--hold-mb 1024] [--epochs 2]`` (one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from bench_scale import WORKFLOW

from orchestrator.configs import student_fit_config
from orchestrator.spec import validate
from tasks.layout import SOFT_TARGETS
from tasks.storage import Storage
from tasks.store.store import SoftTargetStore
from tasks.train.warm import fit_here


def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="a storage root holding one soft-target entry")
    ap.add_argument("--hold-mb", type=float, default=1024.0)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    storage = Storage(str(args.store))
    (key,) = [p.name for p in (args.store / SOFT_TARGETS).iterdir() if (p / "manifest.json").exists()]
    manifest = SoftTargetStore(storage).manifest(key)
    assert manifest is not None
    raw = yaml.safe_load(WORKFLOW.format(rows=manifest["rows"], root=args.store, source="unused", hold=args.hold_mb))
    raw["train"]["epochs"] = args.epochs
    cfg = student_fit_config(validate(raw), manifest, storage, epoch_hook=None)
    before, t0 = vm_hwm_gb(), time.perf_counter()
    res = fit_here(cfg, storage=storage, run_name=f"bench-worker-{time.time_ns()}")
    print(json.dumps({"rows": manifest["rows"], "train_files": len(manifest["splits"]["train"]["shards"]),
                      "hold_mb": args.hold_mb, "before_fit_gb": round(before, 3), "peak_gb": round(vm_hwm_gb(), 3),
                      "peak_mib_by_epoch": [round(h["peak_rss_mb"]) for h in res.history],
                      "fit_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
