"""What a search costs: precomputed soft targets against online KD, and trials/hour with and without pruning.

MNIST-1D (generated offline: 3500 train / 500 val rows) and the models of workflows/mnist1d.yaml: a
cnn1d teacher (channels 32-32-32, stride 1, 23k parameters) and a cnn1d student (channels 6-6, 2.6k
parameters); the teacher costs ~40x the student's FLOPs per row. Batch 128, AdamW, KD kl + CE, one
torch thread.

1. The same N trials (temperature and alpha vary, as in a search), E epochs each, two ways:
   - online KD: every training step runs the teacher forward on its batch (the usual KD loop);
   - precomputed (kdflow): the teacher runs once over the training rows, its logits are encoded as a
     float16 Parquet shard (kdflow's shard format) and every trial decodes that shard and trains on the
     stored logits. The one-off teacher forward + encode is counted once, in the precomputed total.
   Trials of the two kinds alternate, so load from other processes hits both alike.
2. One search (TPE over T, alpha, lr, channels; E2 epochs per trial) run twice in lockstep, pruner none and
   kdflow's median pruner (orchestrator.search.study.make_pruner, per-epoch val accuracy reported to Optuna):
   trials/hour, epochs trained, best val accuracy. Precomputed targets in both.
3. With --ray: the real thing, `kdflow`'s pipeline in this process (trials on warm trial slots, sqlite
   study, MLflow), the same small search with pruner none and median, each in a fresh run (teacher
   trained, slots booting meanwhile) and as a rerun over cached targets (slots booting inside the search):
   search wall_s, train_s, efficiency, trial durations and trials/hour, from the result JSON and the study.

Run from the repository root: ``python benchmarks/bench_search.py [--ray | --ray-only]`` (tables on stdout,
~1 min without --ray on 2 cores, a few more with it; --ray-only runs part 3 alone).
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

import numpy as np
import torch
from torch import nn

from tasks.kinds.classification.data import load_dataset
from tasks.kinds.classification.models import build_model
from tasks.kinds.classification.targets import teacher_logits
from tasks.losses import distillation_objective
from tasks.store.shards import decode_rows, encode_rows

BATCH = 128
TEACHER = {"channels": [32, 32, 32], "kernel_size": 5, "stride": 1}
STUDENT = {"channels": [6, 6], "kernel_size": 5, "stride": 1}
WIDTHS = [4, 6, 8, 12]  # part 2: student channels (two conv layers of this width)
TRIALS, EPOCHS = 8, 20  # part 1
SEARCH_TRIALS, SEARCH_EPOCHS = 24, 20  # part 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flops(model: nn.Module, features: int = 40) -> int:
    """FLOPs of one row's forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, features))
    return counter.get_total_flops()


def train_teacher(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    teacher = build_model("cnn1d", TEACHER, x.shape[1], 10)
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    for _ in range(25):
        for idx in torch.randperm(len(y)).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(teacher(x[idx]), y[idx]).backward()
            opt.step()
    return teacher.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train_student(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *, epochs: int,
                  temperature: float, alpha: float, lr: float = 5e-3, width: int | None = None,
                  teacher: nn.Module | None = None, stored: torch.Tensor | None = None,
                  on_epoch: Any = None) -> tuple[float, int]:
    """One trial. Targets come from `teacher` (online, a forward per step) or `stored` (float16 logits).

    Returns (best val accuracy, epochs run); `on_epoch(epoch, val_acc)` returning True stops the trial.
    """
    torch.manual_seed(0)
    params = {**STUDENT, **({"channels": [width, width]} if width else {})}
    student = build_model("cnn1d", params, x.shape[1], 10)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    best, epoch = 0.0, 0
    for epoch in range(1, epochs + 1):
        student.train()
        for idx in torch.randperm(len(y)).split(BATCH):
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x[idx])
            else:
                t_logits = teacher_logits({"logits": stored[idx]}, 10)
            loss, _ = distillation_objective(student(x[idx]), t_logits, y[idx], loss="kl",
                                             temperature=temperature, alpha=alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        student.eval()
        acc = accuracy(student, xv, yv)
        best = max(best, acc)
        if on_epoch is not None and on_epoch(epoch, acc):
            break
    return best, epoch


def part1(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, teacher: nn.Module) -> dict:
    """N trials online vs precomputed, alternating."""
    # the one-off: best of 3 (a one-off is easily hit by a load spike on a shared machine)
    forward_s = encode_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = teacher(x)
        forward_s = min(forward_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        shard = encode_rows(np.arange(len(y)), x.numpy(), y.numpy(), logits, "logits", "float16", None)
        encode_s = min(encode_s, time.perf_counter() - t0)

    rng = np.random.default_rng(0)
    configs = [(float(np.exp(rng.uniform(np.log(1), np.log(20)))), float(rng.uniform(0.1, 0.95)))
               for _ in range(TRIALS)]
    online, pre, read, acc_online, acc_pre = [], [], [], [], []
    for i, (temperature, alpha) in enumerate(configs):
        t0 = time.perf_counter()
        acc_online.append(train_student(x, y, xv, yv, epochs=EPOCHS, temperature=temperature, alpha=alpha,
                                        teacher=teacher)[0])
        online.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stored = decode_rows(shard, "float16").targets["logits"]  # what a trial's worker reads
        read.append(time.perf_counter() - t0)
        acc_pre.append(train_student(x, y, xv, yv, epochs=EPOCHS, temperature=temperature, alpha=alpha,
                                     stored=stored)[0])
        pre.append(time.perf_counter() - t0)
        log(f"  trial {i + 1}/{TRIALS}: T={temperature:.2f} alpha={alpha:.2f} online {online[-1]:.2f}s "
            f"(acc {acc_online[-1]:.3f}), precomputed {pre[-1]:.2f}s (acc {acc_pre[-1]:.3f})")

    # where a step's time goes, each part measured on its own (best of 5 rounds of 50)
    xb, yb = x[:BATCH], y[:BATCH]
    student = build_model("cnn1d", STUDENT, x.shape[1], 10)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    with torch.no_grad():
        t_fwd = min(_timeit(lambda: teacher(xb)) for _ in range(5))
        s_fwd = min(_timeit(lambda: student(xb)) for _ in range(5))
        tb = teacher(xb)

    def step() -> None:
        loss, _ = distillation_objective(student(xb), tb, yb, loss="kl", temperature=4.0, alpha=0.7)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s_step = min(_timeit(step) for _ in range(5))
    return {"online": sum(online), "precomputed": forward_s + encode_s + sum(pre), "forward_s": forward_s,
            "encode_s": encode_s, "read_s": statistics.mean(read), "shard_bytes": len(shard),
            "acc_online": statistics.mean(acc_online), "acc_pre": statistics.mean(acc_pre),
            "fwd_ratio": t_fwd / s_fwd, "flops_ratio": flops(teacher) / flops(student), "t_fwd": t_fwd,
            "s_fwd": s_fwd, "s_step": s_step}


def _timeit(fn: Any, repeats: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def part2(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, stored: torch.Tensor) -> dict:
    """The same TPE search with pruner none and median, trials taken in turn."""
    import optuna

    from orchestrator.search.study import make_pruner, make_sampler
    from orchestrator.spec import SearchSpec

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = {"distill.temperature": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
             "distill.alpha": {"type": "float", "low": 0.1, "high": 0.95},
             "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
             "student.params.width": {"type": "categorical", "choices": WIDTHS}}
    studies, stats = {}, {}
    for pruner in ("none", "median"):
        spec = SearchSpec(trials=SEARCH_TRIALS, pruner=pruner, space=space)
        studies[pruner] = optuna.create_study(direction="maximize", sampler=make_sampler(spec, 0),
                                              pruner=make_pruner(spec, SEARCH_EPOCHS))
        stats[pruner] = {"seconds": 0.0, "epochs": 0, "pruned": 0}
    for i in range(SEARCH_TRIALS):
        for pruner, study in studies.items():
            trial = study.ask()
            t0 = time.perf_counter()

            def report(epoch: int, acc: float, trial: Any = trial) -> bool:
                trial.report(acc, epoch)
                return trial.should_prune()

            best, epochs = train_student(
                x, y, xv, yv, epochs=SEARCH_EPOCHS, stored=stored, on_epoch=report,
                temperature=trial.suggest_float("distill.temperature", 1.0, 20.0, log=True),
                alpha=trial.suggest_float("distill.alpha", 0.1, 0.95),
                lr=trial.suggest_float("train.optimizer.lr", 1e-4, 3e-2, log=True),
                width=trial.suggest_categorical("student.params.width", WIDTHS))
            stats[pruner]["seconds"] += time.perf_counter() - t0
            stats[pruner]["epochs"] += epochs
            if epochs < SEARCH_EPOCHS:
                stats[pruner]["pruned"] += 1
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, best)
        log(f"  search trial {i + 1}/{SEARCH_TRIALS}: " + ", ".join(
            f"{p} {s['seconds']:.1f}s {s['epochs']} epochs" for p, s in stats.items()))
    for pruner, study in studies.items():
        stats[pruner]["best"] = study.best_value
    return stats


def part3(trials: int, epochs: int) -> dict:
    """kdflow's own search on Ray (warm trial slots), pruner none and median, in two conditions:

    - "fresh": each search in a run that trains the teacher and writes the soft targets (its own storage
      root), as a first run does; the trial slots boot while the teacher trains (issue 11's digits case);
    - "rerun": the teacher and targets of an earlier run reused, so the search starts at once and its clock
      holds the slots' boot (~2.5 s each here), as a second search over the same targets does.
    """
    from orchestrator.cli import stdout_to_stderr
    from orchestrator.pipeline import run_workflow
    from orchestrator.spec import validate

    start, here = os.getcwd(), Path(tempfile.mkdtemp(prefix="kdflow-bench-search-"))
    os.chdir(here)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    base = {"name": "bench-search", "data": {"source": "mnist1d", "split": {"val": 0.1, "test": 0.2}},
            "teacher": {"model": "cnn1d", "params": TEACHER, "train": {"epochs": 25, "batch_size": BATCH}},
            "student": {"model": "cnn1d", "params": STUDENT},
            "train": {"epochs": epochs, "batch_size": BATCH, "workers": 1, "checkpoint_interval_s": 600},
            "registry": {"model": "bench-search-student"}}
    for condition in ("fresh", "rerun"):
        if condition == "rerun":  # the teacher and its soft targets first, in a run of their own
            with stdout_to_stderr():
                run_workflow(validate({**base, "storage": {"root": str(here / "shared")}}))
        for pruner in ("none", "median"):
            root = here / (f"fresh-{pruner}" if condition == "fresh" else "shared")
            spec = validate({**base, "storage": {"root": str(root)}, "search": {
                "trials": trials, "concurrency": 2, "pruner": pruner, "study": f"bench-{pruner}",
                "space": {"distill.temperature": {"type": "float", "low": 1.0, "high": 20.0, "log": True},
                          "distill.alpha": {"type": "float", "low": 0.1, "high": 0.95},
                          "train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}}})
            with stdout_to_stderr():  # Ray's and MLflow's chatter stays off the tables
                result = run_workflow(spec)
            out[condition, pruner] = search_figures(result)
            log(f"  kdflow search, {condition}, pruner {pruner}: {out[condition, pruner]['seconds']:.1f}s, "
                f"{result['search']}")
    import ray

    ray.shutdown()
    os.chdir(start)
    shutil.rmtree(here, ignore_errors=True)
    return out


def search_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The search's own figures from its study and MLflow runs (the tracking URI the run set)."""
    import optuna
    from mlflow import MlflowClient

    from orchestrator.search.study import open_storage

    client = MlflowClient()
    study = optuna.load_study(study_name=result["search"]["study"], storage=open_storage(result["search"]["storage"]))
    # the search stage alone: first trial start to last trial end (no Ray start, teacher or registry)
    seconds = (max(t.datetime_complete for t in study.trials)
               - min(t.datetime_start for t in study.trials)).total_seconds()
    # the epochs' own time (training steps only), from each trial's per-epoch epoch_s in MLflow
    epoch_s = [sum(m.value for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "epoch_s"))
               for t in study.trials]
    durations = [t.duration.total_seconds() for t in study.trials]
    return {"seconds": seconds, "search": result["search"], "epochs": sum(t.user_attrs.get("epochs", 0)
                                                                         for t in study.trials),
            "per_trial": statistics.mean(durations), "median_trial": statistics.median(durations),
            "epoch_s": statistics.mean(epoch_s), "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", action="store_true", help="also time kdflow's own search on Ray (minutes)")
    parser.add_argument("--ray-only", action="store_true", help="only part 3 (kdflow's search on Ray)")
    parser.add_argument("--ray-trials", type=int, default=8)
    parser.add_argument("--ray-epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ray_only:
        log(f"part 3: kdflow search on Ray, {args.ray_trials} trials x {args.ray_epochs} epochs, 2 at a time")
        print_part3(part3(args.ray_trials, args.ray_epochs), args.ray_trials, args.ray_epochs)
        return

    d = load_dataset("mnist1d", val=0.1, test=0.2, seed=0)
    x, y = torch.from_numpy(d.x["train"]), torch.from_numpy(d.y["train"])
    xv, yv = torch.from_numpy(d.x["val"]), torch.from_numpy(d.y["val"])
    log(f"MNIST-1D: {len(y)} train / {len(yv)} val rows; training the teacher")
    teacher = train_teacher(x, y)
    log(f"teacher val accuracy {accuracy(teacher, xv, yv):.3f}")

    log(f"part 1: {TRIALS} trials x {EPOCHS} epochs, online KD vs precomputed")
    p1 = part1(x, y, xv, yv, teacher)
    with torch.inference_mode():
        stored = decode_rows(encode_rows(np.arange(len(y)), x.numpy(), y.numpy(), teacher(x), "logits", "float16",
                                         None), "float16").targets["logits"]
    log(f"part 2: {SEARCH_TRIALS} TPE trials x {SEARCH_EPOCHS} epochs, pruner none vs median")
    p2 = part2(x, y, xv, yv, stored)
    p3 = None
    if args.ray:
        log(f"part 3: kdflow search on Ray, {args.ray_trials} trials x {args.ray_epochs} epochs, 2 at a time")
        p3 = part3(args.ray_trials, args.ray_epochs)

    print(f"\n## 1. {TRIALS}-trial search, {EPOCHS} epochs per trial: online KD vs precomputed soft targets\n")
    print(f"Teacher/student cost: {p1['flops_ratio']:.0f}x FLOPs per row, {p1['fwd_ratio']:.1f}x measured "
          f"forward time. Per batch of {BATCH} (1 thread): teacher forward {p1['t_fwd'] * 1000:.2f} ms, student "
          f"forward {p1['s_fwd'] * 1000:.2f} ms, student training step (forward, KD loss, backward, AdamW) "
          f"{p1['s_step'] * 1000:.2f} ms, so an online step costs "
          f"{(p1['s_step'] + p1['t_fwd']) / p1['s_step']:.2f}x a precomputed one.\n")
    print("| | wall time | per trial | mean best val acc |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| online KD (teacher forward every step) | {p1['online']:.1f} s | {p1['online'] / TRIALS:.2f} s "
          f"| {p1['acc_online']:.3f} |")
    print(f"| precomputed (forward once + float16 shard) | {p1['precomputed']:.1f} s | "
          f"{(p1['precomputed'] - p1['forward_s'] - p1['encode_s']) / TRIALS:.2f} s | {p1['acc_pre']:.3f} |")
    print(f"| ratio online / precomputed | {p1['online'] / p1['precomputed']:.2f}x | | |")
    print(f"\nOne-off cost inside the precomputed total (best of 3): teacher forward {p1['forward_s'] * 1000:.0f} ms, "
          f"encode {p1['encode_s'] * 1000:.0f} ms ({p1['shard_bytes'] / 1e6:.2f} MB shard); each trial's "
          f"shard decode {p1['read_s'] * 1000:.0f} ms.")

    print(f"\n## 2. One TPE search, {SEARCH_TRIALS} trials x up to {SEARCH_EPOCHS} epochs, in-process, with and "
          "without pruning\n")
    print("| pruner | wall time | trials/hour | epochs trained | pruned | best val acc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for pruner, s in p2.items():
        print(f"| {pruner} | {s['seconds']:.1f} s | {SEARCH_TRIALS / s['seconds'] * 3600:,.0f} | {s['epochs']} | "
              f"{s['pruned']} | {s['best']:.3f} |")
    if p3:
        print_part3(p3, args.ray_trials, args.ray_epochs)


def print_part3(p3: dict, trials: int, epochs: int) -> None:
    print(f"\n## 3. kdflow search on Ray ({trials} trials x up to {epochs} epochs, 2 at a "
          "time; the search stage only)\n")
    print("\"fresh\": each search in a run that trains its teacher (the slots boot meanwhile); \"rerun\": the "
          "teacher and targets reused, the slots' boot inside the search's clock.\n")
    print("| condition | pruner | wall_s | train_s | efficiency | median trial | mean trial | of which training "
          "steps | epochs trained | completed | pruned | trials/hour | best val acc | load avg |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (condition, pruner), r in p3.items():
        s = r["search"]
        print(f"| {condition} | {pruner} | {s['wall_s']:.1f} s | {s['train_s']:.1f} s | {s['efficiency']:.2f} "
              f"| {r['median_trial']:.2f} s | {r['per_trial']:.2f} s | {r['epoch_s']:.2f} s | {r['epochs']} "
              f"| {s['completed']} | {s['pruned']} | {trials / s['wall_s'] * 3600:,.0f} "
              f"| {s['best_values']['val_accuracy']:.3f} | {r['load']:.1f} |")
    for condition in ("fresh", "rerun"):
        if (condition, "none") in p3 and (condition, "median") in p3:
            ratio = p3[condition, "none"]["search"]["wall_s"] / p3[condition, "median"]["search"]["wall_s"]
            print(f"\n{condition}: trials/hour with the median pruner / without: {ratio:.2f}x")


if __name__ == "__main__":
    main()
