"""MLflow: where runs are tracked (embedded sqlite or a server), checked before any work starts."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestrator.spec import Workflow
from tasks.errors import UserError
from tasks.layout import MLARTIFACTS, local_state_dir, sqlite_lock
from tasks.storage import Storage


def tracking_uri(spec: Workflow, storage: Storage) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else sqlite beside the soft targets (or in ./.kdflow for S3)."""
    if spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{local_state_dir(storage) / 'mlflow.db'}"


def artifact_location(storage: Storage) -> str:
    return storage.uri(MLARTIFACTS) if storage.is_s3 else Path(storage.path(MLARTIFACTS)).as_uri()


@contextmanager
def artifact_endpoint(storage: Storage) -> Iterator[None]:
    """MLflow's own S3 client reads its endpoint from MLFLOW_S3_ENDPOINT_URL: set it while a run logs
    artifacts to an S3 root with a custom endpoint, and put the environment back as it was afterwards
    (a value the user set is kept)."""
    endpoint = storage.s3_options().get("endpoint_url")
    if not storage.is_s3 or not endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        yield
        return
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)


def check_reachable(spec: Workflow, storage: Storage) -> None:
    """A tracking server that does not answer, or refuses the user, exits 2 here: cheap (no MLflow import),
    so a run checks it before starting Ray."""
    uri = tracking_uri(spec, storage)
    if uri.startswith(("http://", "https://")):
        check_server(uri, where="tracking.uri")


def connect(spec: Workflow, storage: Storage, checked: bool = False) -> str:
    """Point MLflow at the tracking server and the experiment; exit 2 if the server cannot be reached
    (`checked`: `check_reachable` already said it can)."""
    import mlflow

    uri = tracking_uri(spec, storage)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in a run's stderr
    if uri.startswith(("http://", "https://")):
        if not checked:
            check_server(uri, where="tracking.uri")
        from orchestrator.mlflow_http import install

        install(spec.tracking.retries.policy())
    mlflow.set_tracking_uri(uri)
    # Two runs starting at once on a fresh sqlite store would both create its tables (one fails with
    # "table experiments already exists"), and both the experiment: a file lock beside the database
    # makes the first creation one at a time. A server serializes this itself.
    with sqlite_lock(uri):
        if uri.startswith("sqlite:///"):
            seed_sqlite_store(Path(uri.removeprefix("sqlite:///")))
        if mlflow.get_experiment_by_name(spec.experiment) is None:
            location = artifact_location(storage) if not uri.startswith(("http://", "https://")) else None
            try:
                mlflow.create_experiment(spec.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:  # another run (on a server) created it first
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
    mlflow.set_experiment(spec.experiment)
    return uri


def cache_dir() -> Path:
    """kdflow's per-user cache: KDFLOW_CACHE_DIR, else $XDG_CACHE_HOME/kdflow, else ~/.cache/kdflow."""
    if os.environ.get("KDFLOW_CACHE_DIR"):
        return Path(os.environ["KDFLOW_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdflow"


def seed_sqlite_store(db: Path) -> None:
    """A new embedded store starts as a copy of an empty one, instead of running MLflow's schema migrations.

    MLflow builds a fresh sqlite store by running its ~60 Alembic migrations: 4 s on an idle 2-core machine,
    12 s under load, in every new project folder (and every test). The empty store it builds is the same
    each time for one MLflow version, so it is built once per version in the user's cache (`cache_dir`)
    and copied. The template holds no experiment: MLflow adds its Default experiment, with this store's
    own artifact location, when it opens the copy. Anything that goes wrong here leaves the store to MLflow
    (slow, as before), never a broken one: the copy lands under its final name only whole.
    """
    if db.exists():
        return
    try:
        template = empty_store_template()
        part = db.with_name(db.name + ".part")
        shutil.copyfile(template, part)
        os.replace(part, db)
    except (OSError, sqlite3.Error):
        return


def empty_store_template() -> Path:
    """The cache's empty MLflow store for this MLflow version, built (migrations run) if missing.
    `make` builds it at install (`python -m orchestrator.tracking`), so a first run does not wait for it."""
    import mlflow

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    template.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(template) + ".lock"):
        if not template.is_file():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            from orchestrator.quiet import quiet_mlflow_info

            quiet_mlflow_info()
            building = template.with_suffix(".building")
            building.unlink(missing_ok=True)
            store = SqlAlchemyStore(f"sqlite:///{building}", str(template.parent / "unused-artifacts"))
            store.engine.dispose()
            with sqlite3.connect(building) as conn:  # no experiment: MLflow makes its Default on open
                conn.execute("DELETE FROM experiment_tags")
                conn.execute("DELETE FROM experiments")
            conn.close()
            os.replace(building, template)
    return template


def check_server(uri: str, where: str) -> None:
    """The server answers, and accepts this user: credentials come only from MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (never from the workflow or the URI, so no log line, param or tag holds them)."""
    from urllib.parse import urlsplit

    import requests

    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise UserError("credentials in the URI are not accepted (they would be logged with the run); set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead", where=where)
    base = uri.rstrip("/")
    try:
        requests.get(base + "/health", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the MLflow tracking server at {uri}: {type(exc).__name__}",
                        where=where) from None
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:  # a call that needs authentication when the server has it (basic-auth app), harmless otherwise
        reply = requests.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                             auth=(user, password or "") if user else None, timeout=10)
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the MLflow tracking server at {uri}: {type(exc).__name__}",
                        where=where) from None
    if reply.status_code == 401:
        who = f"user {user!r}" if user else "no credentials (set MLFLOW_TRACKING_USERNAME and _PASSWORD)"
        raise UserError(f"the tracking server at {uri} refused {who}: wrong user name or password", where=where)
    if reply.status_code == 403:
        raise UserError(f"the tracking server at {uri} denies user {user!r} access to experiments", where=where)


if __name__ == "__main__":  # `make` runs this once after install
    empty_store_template()


def log_history(history: list[dict[str, float]], prefix: str = "") -> None:
    """A fit's per-epoch metrics on the active MLflow run, with step = epoch (`prefix`: teacher_, baseline_)."""
    import mlflow

    for h in history:
        step = int(h["epoch"])
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in h.items() if k != "epoch"}, step=step)


def log_after_epochs(records: list[dict[str, Any]], render: Callable[[list[int]], str]) -> list[dict[str, float]]:
    """The records of a kind's stage after the epochs (on-policy distillation's refreshes) on the active MLflow
    run: their numbers as metrics at their `step`, their `samples` as one table (token ids rendered as text by
    `render`), so a user sees the student's answers change; returns the numbers (the result's section)."""
    import mlflow

    numbers, rows = [], []
    for r in records:
        step = int(r["step"])
        values = {k: float(v) for k, v in r.items()
                  if k not in ("step", "samples") and isinstance(v, int | float) and not math.isnan(v)}
        mlflow.log_metrics(values, step=step)
        numbers.append({"step": step, **values})
        rows += [{"step": step, **{k: render(v) if isinstance(v, list) else v for k, v in s.items()}}
                 for s in r.get("samples", [])]
    if rows:
        mlflow.log_table({k: [row.get(k) for row in rows] for k in rows[0]}, artifact_file="after_epochs_samples.json")
    return numbers
