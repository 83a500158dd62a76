"""Datasets: built-in generators and the user's Parquet tables, split deterministically and fingerprinted.

Errors name `load_dataset`'s own arguments (`source`, `label`, `features`, `transfer`, `split`); the
orchestrator places them under the workflow's `data:` section. Features are standardized with the
training split's mean and std; the fingerprint covers the rows, the
split and the preprocessing, so any change to them is a new soft-target cache key. The transfer rows (extra
unlabeled rows only the teacher labels) are in `fingerprint` but not in `labeled_fingerprint`: a teacher
trained by the workflow sees only the labeled training split, so adding a transfer set does not retrain it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import UserError
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for

BUILTINS = ("sklearn:digits", "mnist1d")
PREPROCESSING = "standardize-v1"


@dataclass
class Dataset:
    x: dict[str, np.ndarray]  # split -> float32 [N, F] (standardized)
    y: dict[str, np.ndarray]  # split -> int64 [N]; -1 marks unlabeled transfer rows
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    fingerprint: str  # every row the soft targets hold, transfer rows included
    labeled_fingerprint: str  # train, val and test only: what a teacher trained here depends on
    classes: list[Any] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)  # the user's column names (registered model's input)
    # what another task kind carries beside the rows (causal_lm: the tokenizer, and "meta" for the manifest)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def rows(self, split: str) -> int:
        return int(self.y[split].shape[0])

    def distillation_rows(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows the student distils on: the training split, with the transfer rows (label -1) interleaved
        by a seeded permutation, so that every data-parallel worker's contiguous share holds both kinds
        (appended, the last worker would get nearly all the unlabeled rows)."""
        x, y = self.x["train"], self.y["train"]
        if "transfer" not in self.x:
            return x, y
        order = np.random.default_rng(seed).permutation(len(y) + self.rows("transfer"))
        return np.concatenate([x, self.x["transfer"]])[order], np.concatenate([y, self.y["transfer"]])[order]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def _mnist1d_args(seed: int, num_samples: int) -> Any:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    return args


def _mnist1d(extra_rows: int = 0, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The standard 5000 MNIST-1D rows, plus `extra_rows` more from an independent seed (transfer set)."""
    from mnist1d.data import make_dataset

    d = make_dataset(_mnist1d_args(seed, 5000))
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    extra = None
    if extra_rows:
        # make_dataset keeps 80% of num_samples as "train" and the rest as "test": ask for enough
        e = make_dataset(_mnist1d_args(seed + 1_000_003, int(np.ceil(extra_rows / 0.8)) + 1))
        extra = np.concatenate([e["x"], e["x_test"]])[:extra_rows].astype(np.float32)
    return x, y, extra


def _builtin_feature_names(source: str, n: int) -> list[str]:
    if source == "sklearn:digits":
        return [f"pixel_{i // 8}_{i % 8}" for i in range(n)]  # sklearn's own names for the 8x8 grid
    return [f"x{i}" for i in range(n)]


def read_parquet_table(source: str, storage: Storage | None, where: str) -> Any:
    """Read a Parquet file, folder or glob (local or s3://) into one pyarrow Table."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    opts = storage.s3_options() if storage is not None else {}
    fs = filesystem_for(source, opts)
    path = source.removeprefix("s3://")
    try:
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
            if not files:
                _missing_bucket(fs, source, where)
                raise UserError(f"no files match {source!r}", where=where)
            dataset = ds.dataset(files, format="parquet", filesystem=fs)
        else:
            if not fs.exists(path):
                _missing_bucket(fs, source, where)
                raise UserError(f"no such file or folder: {source}", where=where)
            dataset = ds.dataset(path, format="parquet", filesystem=fs)
        return dataset.to_table()
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where=where) from None


def _missing_bucket(fs: Any, source: str, where: str) -> None:
    if source.startswith("s3://"):
        bucket = source.removeprefix("s3://").split("/")[0]
        if not fs.exists(bucket):
            raise UserError(f"bucket {bucket!r} does not exist ({source})", where=where)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def feature_columns(table: Any, features: list[str] | str | None, label: str | None, where: str) -> list[str] | str:
    """The feature column(s) of `table`: one list/array column, or numeric columns (default: all but label)."""
    import pyarrow as pa

    names = table.column_names
    if isinstance(features, str):
        if features not in names:
            raise UserError(f"column {features!r} not in the table (columns: {names})", where=_key(where, "features"))
        return features
    if features is None:
        cols = [n for n in names if n != label and (pa.types.is_integer(table.schema.field(n).type)
                                                     or pa.types.is_floating(table.schema.field(n).type))]
        if not cols:
            raise UserError("the table has no numeric feature columns", where=_key(where, "features"))
        return cols
    missing = [c for c in features if c not in names]
    if missing:
        raise UserError(f"columns not in the table: {missing} (columns: {names})", where=_key(where, "features"))
    return list(features)


def table_features(table: Any, features: list[str] | str | None, label: str | None, where: str) -> np.ndarray:
    """Float32 [N, F] features from the columns `feature_columns` picks."""
    import pyarrow as pa

    cols = feature_columns(table, features, label, where)
    if isinstance(cols, str):
        col = table.column(cols).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)
                or pa.types.is_large_list(col.type)):
            raise UserError(f"column {cols!r} is {col.type}, not a list/array column", where=_key(where, "features"))
        try:
            return np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
        except ValueError:
            raise UserError(f"column {cols!r} has rows of different lengths", where=_key(where, "features")) from None
    out = []
    for c in cols:
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise UserError(f"column {c!r} is {t}, not numeric", where=_key(where, "features"))
        out.append(table.column(c).to_numpy(zero_copy_only=False).astype(np.float32))
    return np.stack(out, axis=1)


def _parquet(source: str, features: list[str] | str | None, label: str, transfer: Any,
             storage: Storage | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[Any], list[str]]:
    table = read_parquet_table(source, storage, "source")
    if label not in table.column_names:
        raise UserError(f"label column {label!r} not in the table (columns: {table.column_names})",
                        where="label")
    columns = feature_columns(table, features, label, "")
    x = table_features(table, columns, label, "")
    raw = table.column(label).to_numpy(zero_copy_only=False)
    if any(v is None for v in raw) or (raw.dtype.kind == "f" and np.isnan(raw).any()):
        raise UserError(f"label column {label!r} has missing values", where="label")
    classes, y = np.unique(raw, return_inverse=True)
    extra = None
    if transfer is not None:
        if not isinstance(transfer, str):
            raise UserError("for a Parquet source, transfer is a Parquet source too (a path or glob)",
                            where="transfer")
        # the same feature columns as the labeled rows, in the same order; other columns are ignored
        tt = read_parquet_table(transfer, storage, "transfer")
        missing = [c for c in ([columns] if isinstance(columns, str) else columns) if c not in tt.column_names]
        if missing:
            raise UserError(f"the transfer rows lack the feature columns {missing} (columns: {tt.column_names})",
                            where="transfer")
        extra = table_features(tt, columns, None, "transfer")
        if extra.shape[1] != x.shape[1]:
            raise UserError(f"transfer rows have {extra.shape[1]} features, the data has {x.shape[1]}",
                            where="transfer")
    names = [f"{columns}_{i}" for i in range(x.shape[1])] if isinstance(columns, str) else list(columns)
    return x, y.astype(np.int64), extra, classes.tolist(), names


def load_dataset(source: str, *, features: list[str] | str | None = None, label: str = "label",
                 val: float = 0.15, test: float = 0.15, transfer: int | str | None = None, seed: int = 0,
                 limit: int | None = None, storage: Storage | None = None) -> Dataset:
    """Load, split (stratified-free, seeded permutation) and standardize a dataset."""
    x, y, extra, classes, names = _read_source(source, features, label, transfer, storage)
    if limit:
        x, y = x[:limit], y[:limit]
    if not classes:
        classes = sorted(np.unique(y).tolist())
    if not names:
        names = _builtin_feature_names(source, x.shape[1])
    if len(classes) < 2:
        raise UserError(f"need at least 2 classes, found {len(classes)}", where="label")
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or infinity", where="features")
    return _split_and_standardize(x, y, extra, classes, names, val=val, test=test, seed=seed)


def _read_source(source: str, features: list[str] | str | None, label: str, transfer: int | str | None,
                 storage: Storage | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[Any], list[str]]:
    """Features, labels, transfer rows (or None), class names (empty: the label values) and feature names
    (empty: a built-in's) of `source`."""
    classes: list[Any] = []
    names: list[str] = []
    extra: np.ndarray | None = None
    if source == "sklearn:digits":
        x, y = _digits()
        if transfer is not None:
            raise UserError("sklearn:digits has no generator for transfer rows; give a Parquet source",
                            where="transfer")
    elif source == "mnist1d":
        if isinstance(transfer, str):
            raise UserError("for mnist1d, transfer is a number of extra generated rows", where="transfer")
        x, y, extra = _mnist1d(int(transfer or 0))
    elif source.endswith((".parquet", "/")) or "/" in source or source.startswith("s3://") or "*" in source:
        x, y, extra, classes, names = _parquet(source, features, label, transfer, storage)
    else:
        raise UserError(f"unknown source {source!r}: built-ins are {', '.join(BUILTINS)}, or a Parquet "
                        "file/folder/glob (local or s3://)", where="source")
    return x, y, extra, classes, names


def _split_and_standardize(x: np.ndarray, y: np.ndarray, extra: np.ndarray | None, classes: list[Any],
                           names: list[str], *, val: float, test: float, seed: int) -> Dataset:
    """A seeded permutation into test/val/train, standardized with the training split's mean and std, and
    fingerprinted (rows, split and preprocessing; transfer rows only in `fingerprint`)."""
    n = len(y)
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test), round(n * val)
    if n - n_test - n_val < 2 or n_test < 1:
        raise UserError(f"{n} rows are too few for this split", where="split")
    idx = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    mean = x[idx["train"]].mean(axis=0)
    std = x[idx["train"]].std(axis=0)
    std = np.where(std < 1e-6, 1.0, std).astype(np.float32)
    xs = {k: ((x[v] - mean) / std).astype(np.float32) for k, v in idx.items()}
    ys = {k: y[v] for k, v in idx.items()}
    if extra is not None and len(extra):
        xs["transfer"] = ((extra - mean) / std).astype(np.float32)
        ys["transfer"] = np.full(len(extra), -1, dtype=np.int64)

    h = hashlib.sha256()
    h.update(f"{PREPROCESSING}|seed={seed}|val={val}|test={test}|n={n}|".encode())
    for k in ("test", "train", "val"):
        h.update(k.encode())
        h.update(np.ascontiguousarray(xs[k]).tobytes())
        h.update(np.ascontiguousarray(ys[k]).tobytes())
    labeled = h.hexdigest()
    if "transfer" in xs:
        h.update(b"transfer")
        h.update(np.ascontiguousarray(xs["transfer"]).tobytes())
    return Dataset(x=xs, y=ys, num_classes=len(classes), mean=mean.astype(np.float32), std=std,
                   fingerprint=h.hexdigest(), labeled_fingerprint=labeled, classes=classes, feature_names=names)
