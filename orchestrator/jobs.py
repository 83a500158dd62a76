"""Submitting workflows to a Ray cluster through the Ray Jobs API, and following them."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.cluster import auth_headers
from tasks.errors import UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the address's problem
        hint = " (set RAY_AUTH_TOKEN to the cluster's token)" if "uthentication" in str(exc) else ""
        raise UserError(f"cannot reach the Ray Jobs API: {str(exc).splitlines()[0]}{hint}", where=address) from None


def submit(args: argparse.Namespace) -> int:
    """Ship the working directory (workflow, user factories) and run `kdflow run FILE --json` on the head."""
    from orchestrator.cluster import check, dashboard_nodes
    from orchestrator.spec import load_workflow

    spec = load_workflow(args.file, args.set)  # bad input fails here, before anything is sent
    # Only variables the user names travel: a laptop's 127.0.0.1 endpoints would be wrong on the cluster.
    refuse_secrets(args.forward_env)
    missing = [k for k in args.forward_env if k not in os.environ]
    if missing:
        raise UserError(f"not set in this shell: {', '.join(missing)}", where="--forward-env")
    env = {k: os.environ[k] for k in args.forward_env}
    c = client(args.address)
    check(spec, dashboard_nodes(args.address), env)  # local disk, embedded stores on a multi-node cluster
    sets = [f"--set={s}" for s in args.set]
    rel = os.path.relpath(os.path.abspath(args.file), os.getcwd())
    if not rel.startswith(".."):
        entrypoint = shlex.join(["kdflow", "run", rel, "--json", *sets])
    else:  # outside the shipped directory: the file's text travels in the entrypoint, read from stdin
        text = Path(args.file).read_text()
        entrypoint = f"printf '%s' {shlex.quote(text)} | {shlex.join(['kdflow', 'run', '-', '--json', *sets])}"
    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = c.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": os.getcwd(), "env_vars": env,
                             "excludes": [".venv", ".kdflow", ".git", "mlruns", "*.db", "__pycache__"]},
                metadata={"kdflow.workflow": spec.name},
            )
            break
        except RuntimeError as exc:  # a head that just started has no job agent for a few seconds
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise UserError(str(exc).splitlines()[-1], where=args.address) from None
            time.sleep(2)
    print(job_id)
    if not args.wait:
        return 0
    return follow(c, job_id)


# Names of variables that hold secrets: a job's runtime_env is public on the cluster (the Jobs API,
# `ray job list`, the dashboard show it to everyone who can reach it), so these never travel in it.
SECRET_WORDS = ("SECRET", "PASSWORD", "PASSWD", "TOKEN", "CREDENTIAL", "PRIVATE", "API_KEY", "APIKEY",
                "ACCESS_KEY", "SESSION_KEY", "AUTH")


def refuse_secrets(names: list[str]) -> None:
    """Exit 2 if --forward-env names a secret: its value would be published to every user of the cluster."""
    secret = [n for n in names if any(w in n.upper() for w in SECRET_WORDS)]
    if secret:
        raise UserError(
            f"will not forward {', '.join(secret)}: a job's environment is shown to everyone on the cluster "
            "(Ray's Jobs API, `ray job list`, the dashboard). Give the cluster its credentials itself - the "
            "nodes' environment or a Kubernetes Secret (envFrom), an instance role / IRSA for S3 - as "
            "docs/operations.md, 'Credentials on a cluster', shows", where="--forward-env")


def result_line(logs: str) -> str | None:
    """The job's `kdflow run --json` result: the last log line that is a JSON object with a status.

    Not simply the last line: Ray may log after the driver printed it (a lost node's notices, say)."""
    import json

    for line in reversed(logs.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                if "status" in json.loads(line):
                    return line
    return None


def follow(c: Any, job_id: str, logs_to: Any = None) -> int:
    """Stream the job's logs (to stderr by default) until it ends; exit 0 only if it SUCCEEDED."""
    import asyncio

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            (logs_to or sys.stderr).write(lines)
            (logs_to or sys.stderr).flush()

    with contextlib.suppress(Exception):  # log streaming is best effort; the status below is what counts
        asyncio.run(tail())
    while (status := str(c.get_job_status(job_id))) .split(".")[-1] not in TERMINAL:
        time.sleep(1)
    status = status.split(".")[-1]
    result = result_line(c.get_job_logs(job_id))
    if result is not None and logs_to is None:
        print(result)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def jobs(args: argparse.Namespace) -> int:
    c = client(args.address)
    if args.action == "list":
        for j in c.list_jobs():
            name = (j.metadata or {}).get("kdflow.workflow", "")
            print(f"{j.submission_id}  {str(j.status).split('.')[-1]:10}  {name}  {j.entrypoint}")
        return 0
    if not args.job_id:
        raise UserError(f"jobs {args.action} needs a JOB_ID (see `kdflow jobs list`)")
    try:
        if args.action == "status":
            print(str(c.get_job_status(args.job_id)).split(".")[-1])
        elif args.action == "logs" and args.follow:
            return follow(c, args.job_id, logs_to=sys.stdout)
        elif args.action == "logs":
            print(c.get_job_logs(args.job_id), end="")
        else:
            print("stopped" if c.stop_job(args.job_id) else "already finished")
    except RuntimeError as exc:
        raise UserError(str(exc).splitlines()[0], where=args.job_id) from None
    return 0
