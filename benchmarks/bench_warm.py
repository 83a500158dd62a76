"""Where a search's time goes: trials as Ray Train runs (before) against warm trial slots (after), side by side.

workflows/digits-search.yaml (12 trials, 2 at a time, median pruner, 20 epochs) run in this process
through `kdflow`'s pipeline, on one local Ray, in one working folder, three ways in this order:

- ray-train: every trial its own Ray Train run (KDFLOW_WARM=0, the path before warm slots);
- warm: every trial a call on its slot's long-lived actor (the default now);
- warm, pruner none: the same, without pruning (does the pruner pay off on Ray now?).

The teacher and the soft targets are computed by the first run and reused by the others (a study name per
way, so none resumes another's). For each: the median trial duration from the Optuna study's own
start/complete times, the search's `wall_s` and `train_s` (summed training steps) from the result JSON,
the efficiency `train_s / (wall_s x concurrency)`, trials/hour, and the load average at the end (the
machine is shared). Then each stage's seconds of the warm run.

Run from the repository root: ``python benchmarks/bench_warm.py [--trials N]`` (table on stdout,
progress on stderr; a few minutes on 2 loaded cores, most of it the ray-train way).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(raw: dict[str, Any], label: str, warm: bool, pruner: str, trials: int) -> dict[str, Any]:
    import optuna

    from orchestrator.cli import stdout_to_stderr
    from orchestrator.pipeline import run_workflow
    from orchestrator.search.study import open_storage
    from orchestrator.spec import validate

    raw = {**raw, "search": {**raw["search"], "trials": trials, "pruner": pruner,
                             "study": f"bench-{label.replace(' ', '-').replace(',', '')}-{time.time_ns()}"}}
    os.environ["KDFLOW_WARM"] = "1" if warm else "0"
    t0 = time.perf_counter()
    with stdout_to_stderr():
        result = run_workflow(validate(raw))
    total = time.perf_counter() - t0
    s = result["search"]
    study = optuna.load_study(study_name=s["study"], storage=open_storage(s["storage"]))
    durations = [t.duration.total_seconds() for t in study.trials if t.duration]
    out = {"label": label, "median_trial": statistics.median(durations), "wall_s": s["wall_s"],
           "train_s": s["train_s"], "efficiency": s["efficiency"], "completed": s["completed"],
           "pruned": s["pruned"], "failed": s["failed"], "best": s["best_values"].get("val_accuracy"),
           "epochs": sum(t.user_attrs.get("epochs", 0) for t in study.trials), "run_s": total,
           "stages": result["stages"], "load": os.getloadavg()}
    log(f"{label}: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    raw = yaml.safe_load((ROOT / "workflows" / "digits-search.yaml").read_text())
    start, here = os.getcwd(), Path(tempfile.mkdtemp(prefix="kdflow-bench-warm-"))
    os.chdir(here)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{here}/mlflow.db"
    raw["registry"].pop("promote", None)  # no gates: the figures are about the search
    try:
        rows = [run_one(raw, "ray-train", False, "median", args.trials),
                run_one(raw, "warm", True, "median", args.trials),
                run_one(raw, "warm, pruner none", True, "none", args.trials)]
    finally:
        import ray

        ray.shutdown()
        os.chdir(start)
        shutil.rmtree(here, ignore_errors=True)

    conc = raw["search"]["concurrency"]
    print(f"workflows/digits-search.yaml, {args.trials} trials, {conc} at a time, up to "
          f"{raw['train']['epochs']} epochs; {os.cpu_count()} CPUs.\n")
    print("| trials run as | pruner | median trial | search wall_s | train_s | train_s / (wall_s x "
          f"{conc}) | trials/hour | epochs | completed / pruned / failed | best val acc | load avg (1 min) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        pruner = "none" if "none" in r["label"] else "median"
        print(f"| {r['label'].split(',')[0]} | {pruner} | {r['median_trial']:.2f} s | {r['wall_s']:.1f} s | "
              f"{r['train_s']:.1f} s | {r['efficiency']:.2f} | {args.trials / r['wall_s'] * 3600:,.0f} | "
              f"{r['epochs']} | {r['completed']} / {r['pruned']} / {r['failed']} | {r['best']:.3f} | "
              f"{r['load'][0]:.1f} |")
    print("\nStages, seconds (the first run trains the teacher and computes the soft targets; the others reuse them):\n")
    names = list(dict.fromkeys(k for r in rows for k in r["stages"]))
    print("| run | " + " | ".join(names) + " | whole run |")
    print("| --- | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in rows:
        print(f"| {r['label']} | " + " | ".join(f"{r['stages'].get(n, 0):.1f}" for n in names)
              + f" | {r['run_s']:.1f} |")


if __name__ == "__main__":
    main()
