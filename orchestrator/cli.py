"""The `kdflow` command: validate, schema, run, cache, models, promote, rollback, ui, submit, jobs.

Results go to stdout (one JSON object with --json); everything else, Ray's and MLflow's chatter
included, goes to stderr. A user mistake exits 2 with one message naming the key or resource.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tasks.errors import UserError


@contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """While work runs, fd 1 points at stderr (libraries and Ray workers print); results use the saved fd.

    And Python's sys.stdout and sys.stderr are one locked, line-flushed stream meanwhile: Ray prints worker
    lines from its own thread while the progress lines come from the main one, and two text streams on one
    descriptor (or one text stream written from two threads: io.TextIOWrapper is not thread-safe) glued a
    stage line to the end of a worker's line, or lost it, on a busy machine."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w")
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = LockedLines(sys.stderr)
    try:
        yield out
    finally:
        sys.stdout, sys.stderr = streams
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        out.flush()


class LockedLines(io.TextIOBase):
    """A text stream that many threads may write: each write whole under a lock, flushed at a newline."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            n = self._target.write(text)
            if "\n" in text:
                self._target.flush()
        return n

    def flush(self) -> None:
        with self._lock:
            self._target.flush()

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._target.encoding


def emit(out: Any, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.write(json.dumps(result, default=str) + "\n")
        return
    from orchestrator.registry_cli import print_summary

    print_summary(out, result)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_workflow

    spec = load_workflow(args.file, args.set)
    print(f"{args.file}: valid workflow {spec.name!r}"
          + (f", search over {len(spec.search.space)} key(s), {spec.search.trials} trials" if spec.search else ""))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """The workflow format as JSON Schema, for editors that complete and check workflow YAML files."""
    from orchestrator.spec import workflow_schema

    print(json.dumps(workflow_schema(), indent=1))
    return 0


class RunFailed(Exception):
    """A run ended by an unexpected error, already reported (tagged in MLflow, JSON with --json): exit 1."""


def failure_message(exc: BaseException) -> str:
    """One line for any exception: Ray and SQLAlchemy wrap the cause in lines of context, so prefer the
    last line that reads `SomeError: ...` (a remote traceback's cause), else the first line."""
    import re

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    line = causes[-1] if causes else (lines[0] if lines else "")
    return line if line.startswith(type(exc).__name__) or causes else f"{type(exc).__name__}: {line}".rstrip(": ")


def mark_failed(stage: str, message: str, since: float) -> None:
    """Tag this process's MLflow run (if one started) with the stage and message, its traceback as an
    artifact, and make sure it is FAILED. Best effort: the tracking server may be what failed."""
    import traceback

    with contextlib.suppress(Exception):
        import mlflow

        run = mlflow.last_active_run()
        if run is None or run.info.start_time < since * 1000 - 1000:
            return  # no run started in this call (a failure before tracking), or an earlier one's
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, "kdflow.failed_stage", stage)
        client.set_tag(run.info.run_id, "kdflow.error", message[:4000])
        client.log_text(run.info.run_id, traceback.format_exc(), "error.txt")
        if client.get_run(run.info.run_id).info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")


def read_spec(args: argparse.Namespace) -> Any:
    """The run's workflow (a file, or its text on stdin for `-`), validated; a mistake exits 2 (with --json,
    as a failed result on stdout too)."""
    from orchestrator.spec import load_workflow

    try:
        if args.file == "-":  # the workflow's text on stdin (`kdflow submit` of a file outside the shipped dir)
            import tempfile

            folder = tempfile.mkdtemp(prefix="kdflow-workflow-")
            args.file = os.path.join(folder, "workflow.yaml")
            with open(args.file, "w") as f:
                f.write(sys.stdin.read())
        return load_workflow(args.file, args.set)
    except UserError as exc:
        if args.json:
            print(json.dumps({"workflow": None, "status": "failed", "stage": "validate", "message": str(exc)}))
        raise


def ended(exc: BaseException) -> tuple[BaseException, str, str]:
    """How a run that raised ended: the error to report (a user's mistake found on a worker is exit 2, as on
    the driver), the stage it failed in and one line saying why."""
    from orchestrator import progress
    from tasks.errors import StageFailed, user_error_in
    from tasks.pieces import SourceChanged

    stage = progress.failed_stage or "setup"
    mistake = user_error_in(exc) if isinstance(exc, Exception) else None
    if mistake is not None and mistake is not exc:  # raised on a worker: the same exit 2 as here
        exc = mistake.under("data") if isinstance(mistake, SourceChanged) else mistake
    if isinstance(exc, StageFailed):
        return exc, exc.stage, str(exc).split(" failed: ", 1)[-1]
    if mistake is None and isinstance(exc, Exception) and "mlflow" in sys.modules:
        import mlflow

        from orchestrator.mlflow_http import outage

        exc = outage(exc, mlflow.get_tracking_uri()) or exc
    if isinstance(exc, UserError):
        return exc, stage, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return exc, stage, "interrupted"
    return exc, stage, failure_message(exc)


def cmd_run(args: argparse.Namespace) -> int:
    """Every way a run can end is one result: success, or {status: failed, stage, message} and exit != 0."""
    import time
    import traceback

    from orchestrator import progress

    spec = read_spec(args)
    progress.failed_stage = None
    since = time.time()
    with stdout_to_stderr() as out:
        ray_start = None
        try:
            from orchestrator.runtime import RayStart
            from orchestrator.workspace import precheck

            # what is cheap to check exits 2 before Ray starts; then a local Ray starts on a thread while
            # the run imports torch and MLflow and reads the data
            storage = precheck(spec)
            ray_start = RayStart.begin(spec)
            from orchestrator.pipeline import run_workflow

            result = run_workflow(spec, source=args.file, ray_start=ray_start, storage=storage)
        except (Exception, KeyboardInterrupt) as exc:
            if ray_start is not None:  # a failure before the run took over Ray's start: let it finish first
                ray_start.abandon()
            exc, stage, message = ended(exc)
            if os.environ.get("KDFLOW_DEBUG"):
                traceback.print_exc()
            if getattr(exc, "where", None) != "tracking.uri":  # not when the server is what failed
                mark_failed(stage, message, since)
            if args.json:
                emit(out, {"workflow": spec.name, "status": "failed", "stage": stage, "message": message}, True)
            if isinstance(exc, (UserError, KeyboardInterrupt)):
                raise exc from None
            raise RunFailed(f"stage {stage} failed: {message} (KDFLOW_DEBUG=1 shows the traceback; "
                            "the MLflow run has it as error.txt)") from None
        emit(out, result, args.json)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from orchestrator.spec import load_workflow
    from orchestrator.workspace import storage_for
    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore

    storage = storage_for(load_workflow(args.workflow)) if args.workflow else Storage(args.root)
    try:
        storage.check(create=False)
    except UserError as exc:
        raise exc.under("storage.root" if args.workflow else "--root") from None
    store = SoftTargetStore(storage)
    if args.action == "list":
        entries = store.entries()
        if args.json:
            print(json.dumps(entries))
        for e in entries if not args.json else []:
            print(f"{e['key']}  {'complete' if e['complete'] else 'INCOMPLETE'}  {e.get('format', '-')}/"
                  f"{e.get('dtype', '-')}  rows {e.get('rows', '-')}  bytes {e.get('bytes', '-')}  {e['uri']}"
                  + (f"\n  {e['error']}" if e.get("error") else ""))
        return 0
    if not args.key:
        raise UserError(f"cache {args.action} needs a KEY (see `kdflow cache list`)")
    if args.action == "show":
        m = store.manifest(args.key)
        if m is None:
            raise UserError("no complete soft-target entry with this key", where=store.uri(args.key))
        print(json.dumps(m, indent=1))
        return 0
    if args.action == "verify":
        store.verify(store.require(args.key))
        print(f"ok: every shard of {store.uri(args.key)} matches its checksum")
        return 0
    if not store.remove(args.key):
        raise UserError("no soft-target entry with this key", where=store.uri(args.key))
    print(f"removed {store.uri(args.key)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit

    return submit(args)


def cmd_jobs(args: argparse.Namespace) -> int:
    from orchestrator.jobs import jobs

    return jobs(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdflow", description="Knowledge distillation workflows on Ray.")
    p.add_argument("--version", action="version", version=f"kdflow {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_sets(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("file", help="workflow YAML ('-': read it from stdin, for run)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a workflow key (value parsed as YAML, else taken as text), "
                             "e.g. distill.temperature=8")

    sp = sub.add_parser("validate", help="check a workflow without running it")
    with_sets(sp)
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("schema", help="print the workflow format as JSON Schema (docs/workflow-reference.yaml)")
    sp.set_defaults(fn=cmd_schema)

    sp = sub.add_parser("run", help="run a workflow here (local Ray, or the cluster in RAY_ADDRESS)")
    with_sets(sp)
    sp.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("cache", help="list, show, verify (checksums) or remove stored soft targets")
    sp.add_argument("action", choices=["list", "show", "verify", "rm"])
    sp.add_argument("key", nargs="?")
    sp.add_argument("--root", default=".kdflow", help="storage root (default .kdflow)")
    sp.add_argument("--workflow", help="take the storage root (and S3 options) from this workflow")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_cache)

    from orchestrator.registry_cli import add_parsers

    add_parsers(sub)  # models, promote, rollback, ui

    sp = sub.add_parser("submit", help="submit a workflow to a Ray cluster (Ray Jobs API)")
    with_sets(sp)
    sp.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    sp.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's status")
    sp.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                    help="pass this environment variable of your shell to the job (repeatable); "
                    "never a secret: the job's environment is public on the cluster")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    sp.add_argument("action", choices=["list", "status", "logs", "stop"])
    sp.add_argument("job_id", nargs="?")
    sp.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    sp.add_argument("--follow", action="store_true", help="logs: stream until the job ends (exit 1 unless it "
                                                          "SUCCEEDED)")
    sp.set_defaults(fn=cmd_jobs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.getcwd() not in sys.path:  # 'mypackage.models:make' in the user's folder imports, as with python -m
        sys.path.insert(0, os.getcwd())
    from orchestrator.quiet import quiet_mlflow_info

    quiet_mlflow_info()
    try:
        return int(args.fn(args) or 0)
    except UserError as exc:
        print(f"kdflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdflow: interrupted; finished shards, checkpoints and trials are kept: rerun to resume",
              file=sys.stderr)
        return 130
    except RunFailed as exc:
        print(f"kdflow: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from tasks.errors import StageFailed

        if isinstance(exc, StageFailed):
            print(f"kdflow: {exc}", file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """The `kdflow` command. Its exit stops a local Ray without Ray's one-second wait on its autoscaler
    monitor (`runtime.stop_ray`), and skips the interpreter's last full garbage collection: after a run
    the process holds ~500,000 objects (torch, MLflow, SQLAlchemy, Ray), and that collection took ~3 s of
    a 35 s `make demo`, collecting nothing that matters to a process about to end."""
    code = main()
    import gc

    if "ray" in sys.modules:
        from orchestrator.runtime import stop_ray

        stop_ray()

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
