"""Data lineage in MLflow: a run's data splits and its soft-target store logged as the run's dataset inputs.

Each split is one `mlflow.log_input` with its context (training, validation, test, transfer): the source's
URI, kdflow's data fingerprint as the digest (its first 32 hex digits: MLflow's digest column holds 36
characters), the columns kdflow reads as the schema, and a profile with the split's row count and the full
fingerprint. The soft-target store entry is an input too (context `soft_targets`, its cache key as the
digest, each teacher it came from as a tag: a registered teacher as `models:/NAME/VERSION`). The MLflow UI's
dataset column and run page show them, and a registered version reaches them through its run
(`kdflow models show`: `dataset_lines`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from typing import Any

from tasks.dataset import Dataset

DIGEST_CHARS = 32  # MLflow stores a dataset digest in a 36-character column
CONTEXTS = {"train": "training", "val": "validation", "test": "test", "transfer": "transfer"}
STORE_CONTEXT = "soft_targets"


def digest(fingerprint: str) -> str:
    """The MLflow dataset digest of a kdflow fingerprint or cache key."""
    return fingerprint[:DIGEST_CHARS]


def _source(uri: str) -> Any:
    """MLflow's dataset source for a path or s3:// URI; a built-in (sklearn:digits) is a code source."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    if "/" in uri:
        with contextlib.suppress(MlflowException), warnings.catch_warnings():  # MlflowException: no source
            warnings.simplefilter("ignore")  # type takes it (a glob); the warning: two local types take it
            return resolve_dataset_source(uri)
    return CodeDatasetSource(tags={"kdflow.source": uri})


def _dataset(uri: str, name: str, fingerprint: str, rows: int, columns: dict[str, str]) -> Any:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    class Described(MetaDataset):
        """A dataset of metadata only (kdflow never hands MLflow the rows), with its row count."""

        @property
        def profile(self) -> Any:
            return {"num_rows": rows, "fingerprint": fingerprint}

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}  # MetaDataset leaves it out

    schema = Schema([ColSpec(type=DataType[t], name=c) for c, t in columns.items()]) if columns else None
    return Described(_source(uri), name=name, digest=digest(fingerprint), schema=schema)


def log_data_inputs(data: Dataset, source: str) -> None:
    """Each split of the run's data as one dataset input of the active run, named `<source's name>:<split>`;
    `source` (data.source) stands for a split whose kind did not say where its rows came from."""
    import mlflow

    datasets, contexts, tags = [], [], []
    for split, rows in data.counts.items():
        uri = data.sources.get(split) or source
        name = uri.rstrip("/").rsplit("/", 1)[-1] or "data"
        datasets.append(_dataset(uri, f"{name}:{split}", data.fingerprint, rows, data.columns))
        contexts.append(CONTEXTS.get(split, split))
        tags.append({"kdflow.split": split})
    mlflow.log_inputs(datasets, contexts, tags)


def log_store_input(manifest: dict[str, Any], uri: str, teachers: list[str]) -> None:
    """The soft-target store entry the student distilled from, as a dataset input of the active run."""
    import mlflow

    ds = _dataset(uri, f"soft-targets:{manifest['key'][:12]}", manifest["key"], int(manifest["rows"]), {})
    mlflow.log_input(ds, context=STORE_CONTEXT,
                     tags={"kdflow.teachers": ",".join(teachers), "kdflow.format": str(manifest["format"])})


def dataset_lines(run: Any) -> list[dict[str, Any]]:
    """A run's dataset inputs as kdflow shows them (`kdflow models show`): context, name, digest, rows, source."""
    out = []
    for di in run.inputs.dataset_inputs if run is not None and run.inputs else []:
        ds = di.dataset
        tags = {t.key: t.value for t in di.tags}
        profile = json.loads(ds.profile) if ds.profile else {}
        try:
            source = json.loads(ds.source)
        except (TypeError, ValueError):
            source = ds.source
        where = source.get("uri") or source.get("tags", {}).get("kdflow.source") if isinstance(source, dict) else source
        out.append({"context": tags.get("mlflow.data.context", ""), "name": ds.name, "digest": ds.digest,
                    "rows": profile.get("num_rows"), "source": where or "", "teachers": tags.get("kdflow.teachers")})
    return out
