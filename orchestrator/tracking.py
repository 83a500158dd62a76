"""MLflow: where runs are tracked (embedded sqlite or a server), checked before any work starts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.spec import Workflow
from tasks.errors import UserError
from tasks.layout import MLARTIFACTS, local_state_dir
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


def connect(spec: Workflow, storage: Storage) -> str:
    """Point MLflow at the tracking server and the experiment; exit 2 if the server cannot be reached."""
    import mlflow

    uri = tracking_uri(spec, storage)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            raise UserError(f"cannot reach the MLflow tracking server at {uri}: {type(exc).__name__}",
                            where="tracking.uri") from None
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(spec.experiment) is None:
        location = artifact_location(storage) if not uri.startswith(("http://", "https://")) else None
        mlflow.create_experiment(spec.experiment, artifact_location=location)
    mlflow.set_experiment(spec.experiment)
    return uri
