"""A run's fixed start-up and a search's efficiency, this checkout against an older commit, side by side.

Two workflows, each a real `kdflow run ... --json` process with a fresh storage root (so the teacher is
trained and the soft targets computed every time; MLflow's sqlite store starts empty too):

- demo: `workflows/digits.yaml`, what `make demo` runs;
- search: `workflows/digits-search.yaml` with `--trials` trials (2 at a time, median pruner).

"before" is the commit `--before` exported with `git archive` into a temporary folder and run with this
checkout's Python (`python -m orchestrator.cli` from that folder, so its own code is imported); "after" is
this checkout. The two alternate for `--rounds` rounds. For each run: the process's wall time (start to
exit), the run's own clock (`seconds`), its stages, and for the search `wall_s`, `train_s`, the efficiency
`train_s / (wall_s x concurrency)` and the median trial (from the result JSON and the Optuna study), with
the load average before and after (the machine is shared).

Run from the repository root: ``.venv/bin/python benchmarks/bench_start.py --before REF [--rounds N]
[--trials N] [--only demo|search]`` (table on stdout, progress on stderr).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(ref: str, folder: Path) -> Path:
    """The tree of `ref` (its code, workflows) under `folder`."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_one(code: Path, label: str, workflow: str, trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-start-") as root:
        args = [sys.executable, "-m", "orchestrator.cli", "run", workflow, "--json", "--set", f"storage.root={root}"]
        if "search" in workflow:
            args += ["--set", f"search.trials={trials}", "--set", "registry.promote=null"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "PYTHONPATH": str(code)}
        env.pop("RAY_ADDRESS", None)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=code, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log(f"{label} {workflow} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            return {"label": label, "workflow": workflow, "failed": True, "wall": wall,
                    "load": (load_before, os.getloadavg()[0])}
        out = json.loads(proc.stdout.strip().splitlines()[-1])  # the result line (older code printed more)
        row = {"label": label, "workflow": workflow, "wall": wall, "seconds": out["seconds"], "stages": out["stages"],
               "load": (load_before, os.getloadavg()[0]), "failed": False}
        s = out.get("search")
        if s:
            import optuna

            from orchestrator.search.study import open_storage

            optuna.logging.set_verbosity(optuna.logging.ERROR)
            study = optuna.load_study(study_name=s["study"], storage=open_storage(s["storage"]))
            durations = [t.duration.total_seconds() for t in study.trials if t.duration]
            # code from before the result had `wall_s` (issue 11): the study's first start to its last end
            first = min(t.datetime_start for t in study.trials if t.datetime_start)
            last = max(t.datetime_complete for t in study.trials if t.datetime_complete)
            row.update(search_wall=s.get("wall_s", (last - first).total_seconds()), train_s=s.get("train_s"),
                       efficiency=s.get("efficiency"), median_trial=statistics.median(durations),
                       slots=s.get("slots"))
    log(f"{label} {workflow}: {row}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the git commit to compare against")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--only", choices=["demo", "search"])
    args = ap.parse_args()
    workflows = {"demo": "workflows/digits.yaml", "search": "workflows/digits-search.yaml"}
    chosen = [workflows[args.only]] if args.only else list(workflows.values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-before-") as d:
        before = export(args.before, Path(d))
        for _ in range(args.rounds):
            for wf in chosen:
                for code, label in ((before, f"before ({args.before})"), (ROOT, "after")):
                    rows.append(run_one(code, label, wf, args.trials))
    print(f"{os.cpu_count()} CPUs; fresh storage root and MLflow store per run.\n")
    print("| workflow | code | process wall | run clock | stages (s) | search wall_s | train_s | efficiency "
          "| median trial | load avg before -> after |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if r["failed"]:
            print(f"| {r['workflow']} | {r['label']} | failed after {r['wall']:.1f} s | | | | | | | "
                  f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        def num(v: Any, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        search = (f"{r['search_wall']:.1f} s | {num(r['train_s'], '.1f')} s | {num(r['efficiency'], '.2f')} | "
                  f"{r['median_trial']:.2f} s" if "search_wall" in r else " | | | ")
        print(f"| {r['workflow']} | {r['label']} | {r['wall']:.1f} s | {r['seconds']:.1f} s | {stages} | {search} | "
              f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")


if __name__ == "__main__":
    main()
