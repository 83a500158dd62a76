"""The storage layout: which folder under the storage root holds what, named once.

    soft_targets/<key>/manifest.json, <split>/part-*.parquet   the soft-target store (soft_targets.py)
    teachers/<key>/model.pt                                   teachers trained by a workflow
    teachers/online/<weights digest>.pt                       a teacher an online student's workers rebuild
    checkpoints/<ray train run>/                              Ray Train checkpoints of a running fit
    search/<study>/trial-<n>.pt                               the best weights of each finished trial
    rollouts/<key>.pt                                         on-policy rollouts + teacher scores (by weights,
                                                              prompts, sampling, seed and teachers)
    mlartifacts/                                              MLflow artifacts (embedded tracking only)

The sqlite files of the embedded MLflow and Optuna stores sit in the local state folder: the root
itself when it is local, ./.kdflow when the root is on S3 (sqlite needs a local file).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tasks.storage import Storage

SOFT_TARGETS = "soft_targets"
TEACHERS = "teachers"
CHECKPOINTS = "checkpoints"
SEARCH = "search"
MLARTIFACTS = "mlartifacts"
ROLLOUTS = "rollouts"
LOCAL_STATE_FOR_S3 = ".kdflow"


def teacher_path(storage: Storage, key: str) -> str:
    return storage.path(TEACHERS, key, "model.pt")


def online_teacher_path(storage: Storage, digest: str) -> str:
    """A teacher's {model, params, state_dict} for the workers of an online student, keyed by its weights."""
    return storage.path(TEACHERS, "online", f"{digest}.pt")


def checkpoints_path(storage: Storage, run: str = "") -> str:
    return storage.path(CHECKPOINTS, run)


def rollouts_path(storage: Storage, key: str) -> str:
    """One refresh's on-policy rollouts and the teacher's scores of them (tasks/kinds/causal_lm/on_policy.py)."""
    return storage.path(ROLLOUTS, f"{key}.pt")


def trial_weights_path(storage: Storage, study: str, number: int) -> str:
    return storage.path(SEARCH, study, f"trial-{number}.pt")


def local_state_dir(storage: Storage) -> Path:
    """Where local state files (mlflow.db, optuna.db) go; created on first use."""
    folder = Path(storage.base) if not storage.is_s3 else Path(LOCAL_STATE_FOR_S3).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sqlite_lock(url: str) -> AbstractContextManager[Any]:
    """The file lock beside a sqlite store (`sqlite:///PATH` -> PATH.lock) that its first creation goes under:
    two processes creating the same fresh store at once would both create its tables, and one fail. The
    embedded MLflow store (orchestrator.tracking.connect) and an Optuna sqlite study (search.study.open_storage)
    both take it; other URLs need none (a server serializes this itself)."""
    if not url.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")
