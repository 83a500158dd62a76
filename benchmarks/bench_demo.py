"""`make demo`'s run before and after warm stages, side by side: `kdflow run workflows/digits.yaml` with
KDFLOW_WARM=0 (teacher and student each a Ray Train run, each soft-target shard a Ray task: the path
before) and with the default (one warm actor per run for teacher, shards and student).

Each run is a real `kdflow run ... --json` process, as `make demo` starts it, with a fresh storage root
(so both train the teacher and compute the soft targets; MLflow's sqlite and the registry start empty
too). The ways alternate for `--rounds` rounds. For each run: the process's wall time, the result's
per-stage seconds, and the load average before and after (the machine is shared).

Run from the repository root: ``.venv/bin/python benchmarks/bench_demo.py [--rounds N]`` (table on
stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KDFLOW = Path(sys.executable).with_name("kdflow")
STAGES = ("data", "ray", "teacher", "soft targets", "student", "evaluate", "register")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(warm: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-demo-") as root:
        env = {**os.environ, "KDFLOW_WARM": "1" if warm else "0"}
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([str(KDFLOW), "run", "workflows/digits.yaml", "--json", "--set",
                               f"storage.root={root}"], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"kdflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout)
    return {"way": "warm (after)" if warm else "KDFLOW_WARM=0 (before)", "wall": wall, "seconds": result["seconds"],
            "stages": result["stages"], "load": (load_before, os.getloadavg()[0]),
            "trained": result["teacher"]["trained"], "computed": result["soft_targets"]["computed_shards"],
            "warm": result.get("warm"), "acc": result["student"]["test_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        for warm in (False, True):
            row = run_one(warm)
            rows.append(row)
            log(f"round {r + 1}: {row['way']}: {row['wall']:.1f} s, stages {row['stages']}, load {row['load']}")
    print(f"`kdflow run workflows/digits.yaml`, fresh storage root per run; {os.cpu_count()} CPUs\n")
    print("| run as | process wall | result seconds | " + " | ".join(STAGES)
          + " | teacher trained | shards computed | student test acc | load avg before / after |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " | --- | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['way']} | {row['wall']:.1f} s | {row['seconds']:.1f} s | "
              + " | ".join(f"{row['stages'].get(s, 0.0):.1f}" for s in STAGES)
              + f" | {row['trained']} | {row['computed']} | {row['acc']:.3f} | "
              f"{row['load'][0]:.1f} / {row['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
