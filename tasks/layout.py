"""The storage layout: which folder under the storage root holds what, named once.

    soft_targets/<key>/manifest.json, <split>/part-*.parquet   the soft-target store (soft_targets.py)
    teachers/<key>/model.pt                                   teachers trained by a workflow
    checkpoints/<ray train run>/                              Ray Train checkpoints of a running fit
    search/<study>/trial-<n>.pt                               the best weights of each finished trial
    mlartifacts/                                              MLflow artifacts (embedded tracking only)

The sqlite files of the embedded MLflow and Optuna stores sit in the local state folder: the root
itself when it is local, ./.kdflow when the root is on S3 (sqlite needs a local file).
"""

from __future__ import annotations

from pathlib import Path

from tasks.storage import Storage

SOFT_TARGETS = "soft_targets"
TEACHERS = "teachers"
CHECKPOINTS = "checkpoints"
SEARCH = "search"
MLARTIFACTS = "mlartifacts"
LOCAL_STATE_FOR_S3 = ".kdflow"


def teacher_path(storage: Storage, key: str) -> str:
    return storage.path(TEACHERS, key, "model.pt")


def checkpoints_path(storage: Storage, run: str = "") -> str:
    return storage.path(CHECKPOINTS, run)


def trial_weights_path(storage: Storage, study: str, number: int) -> str:
    return storage.path(SEARCH, study, f"trial-{number}.pt")


def local_state_dir(storage: Storage) -> Path:
    """Where local state files (mlflow.db, optuna.db) go; created on first use."""
    folder = Path(storage.base) if not storage.is_s3 else Path(LOCAL_STATE_FOR_S3).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
