"""The row model every kind shares (`Dataset`: sizes, fingerprints, the split arrays or how to read them),
and the Parquet listing every kind's reader starts from.

A kind's data module subclasses `Dataset` with what its rows are in its own terms (classification: classes,
features and their standardization; causal_lm: the tokenizer) and says what the store keeps of it
(`TaskKind.manifest_meta`); the driver reads only what is here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import UserError
from tasks.pieces import Piece, SplitRows, arrow_tables, open_arrow
from tasks.retry import Retries, is_outage, retried
from tasks.splits import CARVE_VAL, SplitSource
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: features [1797, 64] as float32 (0-16) and labels as int64.

    Read from the CSV that `sklearn.datasets.load_digits` reads, without importing scikit-learn (its import
    with SciPy's takes ~2 s of every run that uses the built-in set); `load_digits` when the file is not
    where it has always been.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise UserError("data.source: sklearn:digits needs scikit-learn installed (pip install scikit-learn)")
    path = os.path.join(next(iter(spec.submodule_search_locations or [""])), "datasets", "data", "digits.csv.gz")
    if not os.path.exists(path):
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data.astype(np.float32), d.target.astype(np.int64)
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


@dataclass(kw_only=True)
class Dataset:
    """A split dataset as the driver holds it: sizes, fingerprints and how to get the rows, never a kind's
    own terms (a kind's subclass adds those: classes and features, a tokenizer)."""

    fingerprint: str  # every row the soft targets hold, transfer rows included
    labeled_fingerprint: str  # train, val and test only: what a teacher trained here depends on
    # split -> its rows (the reduction's counts; "transfer" only when there are transfer rows): sizes come
    # from here, never from the arrays, so asking a size reads nothing
    counts: dict[str, int] = field(default_factory=dict)
    # split -> its rows readable by row range from a Parquet source's pieces (empty for a built-in): the
    # same rows as x/y, for a reader that should not get them from the driver (soft-target shard tasks)
    source_rows: dict[str, SplitRows] = field(default_factory=dict)
    # the split arrays (x: split -> the model's input rows; y: split -> labels, -1 for unlabeled transfer
    # rows), given, or read by `filler` the first time `x` or `y` is asked for
    arrays: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    filler: Callable[[], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] | None = None
    # the workflow section a late fill's error is named under (orchestrator: "data" -> "data.source")
    where: str = ""
    # for the run's lineage (orchestrator/lineage.py): split -> where its rows come from (a path, s3:// URI
    # or built-in), and the columns read, name -> MLflow type name (double, long, string)
    sources: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.counts and self.arrays is not None:
            self.counts = {k: int(v.shape[0]) for k, v in self.arrays[1].items()}

    @property
    def filled(self) -> bool:
        """Whether the split arrays are held (a Parquet source whose workers read it never fills them)."""
        return self.arrays is not None

    def _arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self.arrays is None:
            assert self.filler is not None, "a Dataset needs its arrays or a filler"
            try:
                self.arrays = self.filler()
            except UserError as exc:  # a file changed since the reduction: SourceChanged, still exit 2
                raise (exc.under(self.where) if self.where else exc) from None
        return self.arrays

    @property
    def x(self) -> dict[str, np.ndarray]:
        return self._arrays()[0]

    @property
    def y(self) -> dict[str, np.ndarray]:
        return self._arrays()[1]

    def rows(self, split: str) -> int:
        return int(self.counts[split])

    def precompute_rows(self, seed: int, from_source: bool = True) -> dict[str, tuple[Any, Any]]:
        """Each split's (features, labels) for the soft-target precompute: `SplitRows` that its shard tasks
        read from a Parquet source's pieces, when there are no transfer rows to interleave into train and
        `from_source` (the workers can open the source: `orchestrator.configs.workers_read_source`); else the
        arrays here (which the precompute puts into Ray's object store), filled now if they were not."""
        if from_source and self.source_rows and "transfer" not in self.counts:
            return {k: (r, r) for k, r in self.source_rows.items()}
        return {"train": self.distillation_rows(seed), "val": (self.x["val"], self.y["val"]),
                "test": (self.x["test"], self.y["test"])}

    def distillation_rows(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows the student distils on: the training split, with the transfer rows (label -1) interleaved
        by a seeded permutation, so that every data-parallel worker's contiguous share holds both kinds
        (appended, the last worker would get nearly all the unlabeled rows)."""
        x, y = self.x["train"], self.y["train"]
        if "transfer" not in self.counts:
            return x, y
        order = np.random.default_rng(seed).permutation(len(y) + self.rows("transfer"))
        return np.concatenate([x, self.x["transfer"]])[order], np.concatenate([y, self.y["transfer"]])[order]



@dataclass
class Listed:
    """A Parquet source as the driver sees it from metadata alone: its pieces (row groups) and schema."""

    url: str
    s3_options: dict[str, Any]
    pieces: list[Piece]
    schema: Any
    retries: Retries = field(default_factory=Retries)  # for the readers of its pieces (storage.retries)


def list_parquet(source: str, storage: Storage | None, where: str) -> Listed:
    """The files of a Parquet file, folder or glob (local or s3://), sorted, as pieces: one per row group,
    from the footers only. A file's name (its path under the source's root) is part of its rows' ids.
    An S3 outage while listing is waited for (`storage.retries`)."""
    retries = storage.retries if storage is not None else Retries()
    listed = on_s3(source, retries, where, lambda: _list_parquet(source, storage, where))
    listed.retries = retries
    return listed


def on_s3(source: str, retries: Retries, where: str, call: Callable[[], Any]) -> Any:
    """`call()`, riding out an S3 outage when `source` is on S3; a local source is read once."""
    if not source.startswith("s3://"):
        return call()
    return retried(call, service="S3", retries=retries, where=where)


def _list_parquet(source: str, storage: Storage | None, where: str) -> Listed:
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    opts = storage.s3_options() if storage is not None else {}
    fs = filesystem_for(source, opts)
    # a local source by its absolute path: a file's name under the root stays the same from any working
    # directory, and a Ray task elsewhere opens the same file
    path = source.removeprefix("s3://") if source.startswith("s3://") else os.path.abspath(source)
    try:
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
            if not files:
                _missing_bucket(fs, source, where)
                raise UserError(f"no files match {source!r}", where=where)
            root = path[:min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        else:
            if not fs.exists(path):
                _missing_bucket(fs, source, where)
                raise UserError(f"no such file or folder: {source}", where=where)
            if fs.isdir(path):
                files = sorted(ds.dataset(path, format="parquet", filesystem=fs).files)
                root = path.rstrip("/")
            else:
                files, root = [path], path.rsplit("/", 1)[0]
        pieces: list[Piece] = []
        schema = None
        for f in files:
            with fs.open(f, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file_schema = meta.schema.to_arrow_schema()
            schema = schema or file_schema
            name = f[len(root):].lstrip("/") if f.startswith(root) else f
            start = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    pieces.append(Piece(name=name, path=f, row_group=g, start=start, rows=rows, group_rows=rows))
                start += rows
    except (*S3_ERRORS, pa.ArrowException) as exc:
        if is_outage(exc):
            raise
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where=where) from None
    return Listed(source, opts, pieces, schema)


def list_arrow(src: SplitSource, storage: Storage | None) -> Listed:
    """A `save_to_disk` split's Arrow stream files as pieces, one per file: its rows counted batch by batch
    (memory-mapped locally, so nothing is decoded), its schema from the stream's header."""
    import pyarrow as pa

    opts = storage.s3_options() if storage is not None else {}
    fs = filesystem_for(src.uri, opts)
    remote = src.uri.startswith("s3://")
    pieces: list[Piece] = []
    schema = None
    try:
        for f in src.arrow_files:
            if not fs.exists(f):
                raise UserError(f"no such file: {f} (listed in its state.json)", where=src.where)
            with open_arrow(fs, f, remote) as fh:
                stream = pa.ipc.open_stream(fh)
                schema = schema or stream.schema
                rows = sum(b.num_rows for b in stream)
            if rows:
                pieces.append(Piece(name=f.rsplit("/", 1)[-1], path=f, row_group=0, start=0, rows=rows,
                                    group_rows=rows))
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Arrow from {src.uri}: {describe_s3_error(exc)}", where=src.where) from None
    return Listed(src.uri, opts, pieces, schema)


def list_source(src: SplitSource, storage: Storage | None, carve_val: bool = False) -> Listed:
    """One split source's pieces (Parquet or Arrow); a given split's pieces carry it, their names prefixed
    with it (so the fingerprint says which split a file was), and a training split that `carve_val`s is
    hash-split into train and val."""
    listed = list_arrow(src, storage) if src.arrow_files else list_parquet(src.uri, storage, src.where)
    if src.split:
        tag = CARVE_VAL if carve_val and src.split == "train" else src.split
        listed.pieces = [dataclasses.replace(p, name=f"{src.split}/{p.name}", split=tag) for p in listed.pieces]
    return listed


def read_table(src: SplitSource, storage: Storage | None) -> Any:
    """One split source read whole into a pyarrow Table, for a kind that reads its documents whole."""
    import pyarrow as pa

    if not src.arrow_files:
        return read_parquet_table(src.uri, storage, src.where)
    listed = list_arrow(src, storage)
    fs = filesystem_for(src.uri, listed.s3_options)
    try:
        tables = [t for p in listed.pieces for t in arrow_tables(fs, p, listed.schema.names,
                                                                  src.uri.startswith("s3://"), src.where)]
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Arrow from {src.uri}: {describe_s3_error(exc)}", where=src.where) from None
    return pa.concat_tables(tables) if tables else listed.schema.empty_table()


def read_parquet_table(source: str, storage: Storage | None, where: str) -> Any:
    """Read a Parquet file, folder or glob (local or s3://) into one pyarrow Table, for a kind that reads its
    source whole (documents); a large table is read piece by piece from `list_parquet`'s pieces instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = list_parquet(source, storage, where)
    fs = filesystem_for(source, listed.s3_options)

    def read(f: str) -> Any:
        with fs.open(f, "rb") as fh:
            return pq.read_table(fh)

    try:
        tables = [on_s3(source, listed.retries, where, lambda f=f: read(f))
                  for f in dict.fromkeys(p.path for p in listed.pieces)]
        return pa.concat_tables(tables, promote_options="default") if tables else listed.schema.empty_table()
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where=where) from None


def _missing_bucket(fs: Any, source: str, where: str) -> None:
    if source.startswith("s3://"):
        bucket = source.removeprefix("s3://").split("/")[0]
        if not fs.exists(bucket):
            raise UserError(f"bucket {bucket!r} does not exist ({source})", where=where)

