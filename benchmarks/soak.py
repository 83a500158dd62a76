"""Fault-injection soak: kdflow runs on a two-node local Ray cluster, with S3 (moto's server) and a real
`mlflow server`, while faults drawn from a seed kill its parts at random times. Not a CI test: it runs for as
long as it is given (hours for 100 faults on 2 cores).

Each run is a workflow (`clf`: digits with an S3 root; `search`: a 4-trial search; `lm`: a tiny causal LM)
started as a user starts it (`kdflow run`, joining the cluster through RAY_ADDRESS, as inside a Ray job), with
its own store prefix so that every stage happens for real. During it, `--per-run` faults fire, each aimed by
the seed at a stage where it can hit (a worker kill where workers work, the rest anywhere) and a delay after
the stage starts, each one of:

  train_worker   SIGKILL a training worker (a warm TrialWorker or a Ray Train worker)
  precompute     SIGKILL a worker computing soft-target shards (a TrialWorker shard call or a shard task)
  slot           SIGKILL a warm trial slot (a search's TrialWorker)
  node           SIGKILL the non-head node's whole process group, then start a new one in its place
  driver         SIGKILL the `kdflow run` process (its process group), then start the same command again
  mlflow         SIGKILL the MLflow server, start it again (same port, same store) after 3-10 s
  s3             the S3 endpoint unreachable for 3-10 s (a proxy cuts every connection and refuses new
                 ones: moto keeps its buckets in memory, so killing it would lose the data, not test kdflow)

For every run it checks: the run finished (after a driver kill, its rerun did, resuming), its soft-target
store verifies (`kdflow cache verify`: every shard's checksum as the manifest says) and holds no extra or
temporary object, its MLflow run has its metrics and its registered model exactly one version from it, and
its result equals a fault-free run's (soft-target key, teacher and student test accuracy) where the workflow
is deterministic. It prints a table: faults per kind and stage, runs finished, results equal, anything lost.

    .venv/bin/python benchmarks/soak.py --seed 25 --faults 100 [--per-run 2] [--minutes 240]
        [--workflows clf search lm] [--out benchmarks/RESULTS-soak.md] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster import TwoNodes
from tests.conftest import BIN, free_port, wait_for_http
from tests.proxy import Proxy

FAULTS = ("train_worker", "precompute", "slot", "node", "driver", "mlflow", "s3")
TINY = {"train.epochs": 12, "teacher.train.epochs": 6, "soft_targets.shards": 6}
WORKFLOWS: dict[str, dict[str, Any]] = {
    "clf": {"file": "workflows/digits.yaml", "sets": TINY, "faults": FAULTS[:2] + FAULTS[3:], "deterministic": True},
    "search": {"file": "workflows/digits-search.yaml",
               "sets": {**TINY, "search.trials": 4, "search.concurrency": 2, "train.epochs": 8},
               "faults": FAULTS, "deterministic": False},
    "lm": {"file": "workflows/lm-stdlib.yaml",
           "sets": {"data.corpus.max_bytes": 60000, "teacher.train.epochs": 2, "train.epochs": 2,
                    "soft_targets.shards": 4, "distill.baseline": False},
           "faults": FAULTS[:2] + FAULTS[3:], "deterministic": False},
}


STAGES = ("data", "tracking", "teacher", "soft targets", "student", "search", "evaluate", "register")
# where each fault is aimed: a worker kill where workers work, the services and the node anywhere
AIM = {"train_worker": ("teacher", "student", "search"), "precompute": ("soft targets",), "slot": ("search",),
       "node": STAGES[2:], "driver": STAGES, "mlflow": STAGES, "s3": STAGES}


@dataclass
class Fault:
    kind: str
    aim: str  # the stage it fires in, `delay_s` after the stage starts (if the stage lasts that long)
    delay_s: float
    stage: str = "-"  # where it fired ("-": the run never reached it)
    at_s: float = 0.0
    hit: str = ""  # what it killed or cut ("" = nothing to kill at that moment)


@dataclass
class Run:
    n: int
    workflow: str
    faults: list[Fault] = field(default_factory=list)
    attempts: int = 0
    finished: bool = False
    equal: bool | None = None
    problems: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Services:
    """The S3 server behind a proxy, the MLflow server (killable, restarted on its port), the two nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        port = free_port()
        self.moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_http(f"http://127.0.0.1:{port}")
        self.s3 = Proxy(port)
        os.environ.update(AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak-" + os.urandom(8).hex(),
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.s3.url)
        import boto3

        boto3.client("s3", endpoint_url=self.s3.url).create_bucket(Bucket="soak")
        self.mlflow_port = free_port()
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.mlflow: subprocess.Popen | None = None
        self.restarting = threading.Event()
        self.start_mlflow()
        (root / "cluster").mkdir()
        self.cluster = TwoNodes(root / "cluster", cpus=4).start()

    def start_mlflow(self) -> None:
        store = self.root / "mlflow"
        store.mkdir(exist_ok=True)
        self.mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
             "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.mlflow_port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=(store / "server.log").open("a"), start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for_http(f"{self.mlflow_uri}/health", timeout=300, proc=self.mlflow)

    def kill_mlflow(self, down_s: float) -> bool:
        """Kill the server and start it again after `down_s`; False when it is still coming back from the
        last kill (nothing to hit: a second kill then would leave it down for good)."""
        if self.restarting.is_set():
            return False
        assert self.mlflow is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.mlflow.wait()
        self.restarting.set()

        def restart() -> None:
            time.sleep(down_s)
            self.start_mlflow()
            self.restarting.clear()

        threading.Thread(target=restart, daemon=True).start()
        return True

    def stop(self) -> None:
        self.cluster.stop()
        if self.mlflow is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.s3.close()
        self.moto.terminate()


def ray_processes(*names: str) -> list[int]:
    """PIDs of Ray worker processes whose title is ray::NAME... (an actor's class or a task's function)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(title.startswith(f"ray::{n}") for n in names):
                found.append(int(cmdline.parent.name))
    return found


def kill_one(pids: list[int], rng: random.Random) -> str:
    if not pids:
        return ""
    pid = rng.choice(pids)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return f"pid {pid}"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(tempfile.mkdtemp(prefix="kdflow-soak-"))
        self.services = Services(self.root)
        self.baselines: dict[str, dict[str, Any]] = {}
        self.runs: list[Run] = []

    # ------------------------------------------------------------------ one run
    def command(self, run: Run) -> tuple[list[str], dict[str, str]]:
        w = WORKFLOWS[run.workflow]
        sets = {**w["sets"], "storage.root": f"s3://soak/{run.workflow}-{run.n}", "tracking.uri":
                self.services.mlflow_uri, "name": f"soak-{run.workflow}", "registry.model": f"soak-{run.workflow}"}
        if run.workflow == "search":  # a multi-node cluster needs a study store the head keeps
            sets["search.storage"] = f"journal://{self.root / f'search-{run.n}.journal'}"
        args = [str(BIN / "kdflow"), "run", str(REPO / w["file"]), "--json"]
        for k, v in sets.items():
            args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        env = {**os.environ, "RAY_ADDRESS": self.services.cluster.gcs, "RAY_AUTH_MODE": "token",
               "TMPDIR": str(self.root / "tmp")}
        (self.root / "tmp").mkdir(exist_ok=True)
        return args, env

    def attempt(self, run: Run, faults: list[Fault]) -> tuple[int | None, str, str]:
        """One `kdflow run`; the faults due during it fire; returns (exit code or None if the driver was
        killed, stdout, stderr)."""
        args, env = self.command(run)
        log = self.root / f"run-{run.n}-{run.attempts}.err"
        with log.open("w") as err:
            proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
            t0 = time.monotonic()
            out_holder: list[str] = []
            reader = threading.Thread(target=lambda: out_holder.append(proc.stdout.read()), daemon=True)
            reader.start()
            pending = list(faults)
            killed = False
            entered: dict[str, float] = {}
            while proc.poll() is None and not killed:
                stage = current_stage(log.read_text(errors="replace"))
                entered.setdefault(stage, time.monotonic())
                for fault in [f for f in pending if f.aim == stage]:
                    if time.monotonic() - entered[stage] >= fault.delay_s:
                        pending.remove(fault)
                        fault.stage, fault.at_s = stage, time.monotonic() - t0
                        killed |= self.fire(fault, proc)
                        if killed:
                            break
                time.sleep(0.1)
            reader.join(timeout=30)
        return (None if killed else proc.returncode), "".join(out_holder), log.read_text(errors="replace")

    def fire(self, fault: Fault, proc: subprocess.Popen) -> bool:
        """Inject one fault; True when it killed the driver."""
        down = self.rng.uniform(3, 10)
        if fault.kind in ("train_worker", "slot"):
            fault.hit = kill_one(ray_processes("TrialWorker", "RayTrainWorker"), self.rng)
        elif fault.kind == "precompute":
            fault.hit = kill_one(ray_processes("compute_shards", "join_shard", "TrialWorker.shard"), self.rng)
        elif fault.kind == "node":
            self.services.cluster.restart_worker()
            fault.hit = "worker node"
        elif fault.kind == "driver":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            fault.hit = "driver"
            say_fault(fault)
            return True
        elif fault.kind == "mlflow":
            fault.hit = f"server, {down:.0f} s" if self.services.kill_mlflow(down) else ""
        elif fault.kind == "s3":
            self.services.s3.away_for(down)
            fault.hit = f"endpoint, {down:.0f} s"
        say_fault(fault)
        return False

    def run_one(self, run: Run, faults: list[Fault]) -> None:
        t0 = time.monotonic()
        while run.attempts < 4:
            run.attempts += 1
            # a rerun after a driver kill gets no new faults: it is the resume that is checked
            code, out, err = self.attempt(run, faults if run.attempts == 1 else [])
            if code is None:
                continue  # the driver was killed: start it again, as a user resubmits
            run.finished = code == 0
            lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
            run.result = json.loads(lines[-1]) if lines else {}
            if not run.finished:
                run.problems.append(f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
            break
        run.seconds = time.monotonic() - t0
        run.faults = [f for f in faults if f.stage != "-"]  # those due after the run ended never fired
        if run.finished:
            self.check(run)

    # ------------------------------------------------------------------ checks
    def check(self, run: Run) -> None:
        from mlflow import MlflowClient

        r = run.result
        key = r.get("soft_targets", {}).get("cache_key")
        root = f"s3://soak/{run.workflow}-{run.n}"
        proc = subprocess.run([str(BIN / "kdflow"), "cache", "verify", str(key), "--root", root],
                              check=False, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            run.problems.append(f"store: {proc.stderr.strip()[-300:]}")
        run.problems += self.extra_objects(root, key)
        client = MlflowClient(self.services.mlflow_uri)
        reg = r.get("registry") or {}
        if reg.get("version"):
            mine = client.search_model_versions(f"name = '{reg['model']}' and run_id = '{reg['run_id']}'")
            if len(mine) != 1:
                run.problems.append(f"registry: {len(mine)} versions from run {reg['run_id']}")
            metrics = client.get_run(reg["run_id"]).data.metrics
            if not {"test_accuracy", "perplexity"} & set(metrics):  # the test split's headline, either kind
                run.problems.append(f"mlflow: metrics missing ({sorted(metrics)[:8]})")
        base = self.baselines.get(run.workflow)
        if base is not None and WORKFLOWS[run.workflow]["deterministic"]:
            run.equal = summary(base) == summary(r)
            if not run.equal:
                run.problems.append(f"result differs: {summary(r)} vs fault-free {summary(base)}")

    def extra_objects(self, root: str, key: str | None) -> list[str]:
        """Objects in the entry that its manifest does not list (a shard written twice, a half one)."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.services.s3.url, skip_instance_cache=True)
        base = f"{root.removeprefix('s3://')}/soft_targets/{key}"
        try:
            manifest = json.loads(fs.cat_file(f"{base}/manifest.json"))
            listed = {sh["path"] for s in manifest["splits"].values() for sh in s["shards"]}
            have = {p[len(base) + 1:] for p in fs.find(base)} - {"manifest.json"}
        except Exception as exc:  # noqa: BLE001 - reported as a problem of the run
            return [f"store listing: {exc}"]
        extra = sorted(have - listed)
        return [f"store: objects the manifest does not list: {extra[:5]}"] if extra else []

    # ------------------------------------------------------------------ the soak
    def baseline(self, workflow: str) -> None:
        run = Run(n=0, workflow=workflow)
        self.run_one(run, [])
        if not run.finished:
            raise SystemExit(f"the fault-free {workflow} run failed: {run.problems}")
        self.baselines[workflow] = run.result
        print(f"baseline {workflow}: {run.seconds:.0f} s, {summary(run.result)}", file=sys.stderr, flush=True)

    def main(self) -> None:
        a = self.args
        deadline = time.monotonic() + a.minutes * 60
        for w in a.workflows:
            self.baseline(w)
        injected = 0
        n = 0
        while injected < a.faults and time.monotonic() < deadline:
            n += 1
            w = a.workflows[(n - 1) % len(a.workflows)]
            kinds = [self.rng.choice(WORKFLOWS[w]["faults"]) for _ in range(min(a.per_run, a.faults - injected))]
            faults = [Fault(k, self.rng.choice(AIM[k]), self.rng.uniform(0.2, 3.0)) for k in kinds]
            run = Run(n=n, workflow=w)
            print(f"run {n} ({w}): faults {[f'{f.kind}@{f.aim}+{f.delay_s:.1f}s' for f in faults]}", file=sys.stderr,
                  flush=True)
            self.run_one(run, faults)
            injected += len(run.faults)
            self.runs.append(run)
            print(f"run {n} ({w}): {'finished' if run.finished else 'FAILED'} in {run.seconds:.0f} s, "
                  f"{len(run.faults)} fault(s), problems: {run.problems or 'none'}", file=sys.stderr, flush=True)
        report = table(self.runs, a)
        print(report)
        if a.out:
            Path(a.out).write_text(report)


def say_fault(fault: Fault) -> None:
    print(f"  fault {fault.kind} at {fault.at_s:.0f} s ({fault.stage}): {fault.hit or 'nothing to hit'}",
          file=sys.stderr, flush=True)


def current_stage(stderr: str) -> str:
    """The stage the run is in: the last "▶ NAME ..." line's NAME, one of STAGES (or the other, e.g. "ray")."""
    for line in reversed(re.findall(r"▶ ([^\n]*)", stderr)):
        for name in sorted(STAGES, key=len, reverse=True):
            if line.startswith(name):
                return name
        return line.split(" ")[0]
    return "setup"


def summary(result: dict[str, Any]) -> dict[str, Any]:
    st, t, s = result.get("soft_targets", {}), result.get("teacher", {}), result.get("student", {})
    return {"key": st.get("cache_key"), "teacher": t.get("test_accuracy"), "student": s.get("test_accuracy")}


def table(runs: list[Run], args: argparse.Namespace) -> str:
    by: Counter[tuple[str, str]] = Counter()
    hit: Counter[str] = Counter()
    for r in runs:
        for f in r.faults:
            by[(f.kind, f.stage)] += 1
            hit[f.kind] += bool(f.hit)
    stages = sorted({s for _, s in by})
    title = f"# Soak: seed {args.seed}, {sum(by.values())} faults over {len(runs)} runs ({', '.join(args.workflows)})"
    lines = [title, "",
             "    .venv/bin/python benchmarks/soak.py " + " ".join(sys.argv[1:]), "",
             "| fault | " + " | ".join(stages) + " | total | hit something |",
             "| --- | " + " | ".join("---:" for _ in stages) + " | ---: | ---: |"]
    for kind in FAULTS:
        if any(k == kind for k, _ in by):
            lines.append(f"| {kind} | " + " | ".join(str(by[(kind, s)] or "") for s in stages)
                         + f" | {sum(by[(kind, s)] for s in stages)} | {hit[kind]} |")
    finished = sum(r.finished for r in runs)
    compared = [r for r in runs if r.equal is not None]
    problems = defaultdict(list)
    for r in runs:
        for p in r.problems:
            problems[r.workflow].append(f"run {r.n}: {p}")
    verdict = (f"Runs finished: {finished} of {len(runs)} (driver kills resumed by a rerun: "
               f"{sum(r.attempts > 1 for r in runs)}). Results equal to the fault-free run: "
               f"{sum(bool(r.equal) for r in compared)} of {len(compared)} deterministic runs. "
               f"Anything lost: {'nothing' if not problems else 'see below'}.")
    lines += ["", verdict, ""]
    for w, ps in problems.items():
        lines += [f"- {w}: {p}" for p in ps]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=25)
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--per-run", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=240)
    ap.add_argument("--workflows", nargs="+", default=["clf", "search", "lm"], choices=sorted(WORKFLOWS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the soak's folder (logs, stores)")
    args = ap.parse_args()
    # stopped with SIGTERM (kill, timeout): still stop the cluster and the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soak = Soak(args)
    try:
        soak.main()
    finally:
        soak.services.stop()
        if not args.keep:
            shutil.rmtree(soak.root, ignore_errors=True)
        else:
            print(f"kept {soak.root}", file=sys.stderr)


if __name__ == "__main__":
    main()
