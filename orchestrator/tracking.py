"""MLflow: where runs are tracked (embedded sqlite or a server), checked before any work starts."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock

from orchestrator.errors import UserError
from orchestrator.spec import Workflow
from tasks.storage import Storage


def tracking_uri(spec: Workflow, storage: Storage) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else sqlite beside the soft targets (or in ./.kdflow for S3)."""
    if spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(storage.base) if not storage.is_s3 else Path(".kdflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(storage: Storage) -> str:
    return storage.uri("mlartifacts") if storage.is_s3 else Path(storage.path("mlartifacts")).as_uri()


def connect(spec: Workflow, storage: Storage) -> str:
    """Point MLflow at the tracking server and the experiment; exit 2 if the server cannot be reached."""
    import mlflow

    uri = tracking_uri(spec, storage)
    endpoint = storage.s3_options().get("endpoint_url")
    if storage.is_s3 and endpoint:  # MLflow's own S3 client reads its endpoint from this variable
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            raise UserError(f"cannot reach the MLflow tracking server at {uri}: {type(exc).__name__}",
                            where="tracking.uri") from None
    mlflow.set_tracking_uri(uri)
    # Two runs starting at once on a fresh sqlite store would both create its tables (one fails with
    # "table experiments already exists"), and both the experiment: a file lock beside the database
    # makes the first creation one at a time. A server serializes this itself.
    lock = FileLock(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else nullcontext()
    with lock:
        if mlflow.get_experiment_by_name(spec.experiment) is None:
            location = artifact_location(storage) if not uri.startswith(("http://", "https://")) else None
            try:
                mlflow.create_experiment(spec.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:  # another run (on a server) created it first
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
    mlflow.set_experiment(spec.experiment)
    return uri
