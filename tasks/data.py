"""Datasets: built-in generators and the user's Parquet tables, split deterministically and fingerprinted.

Rows are read piece by piece (tasks/pieces.py): a Parquet source's row groups, from a listing and its
footers, or a built-in's arrays; each row's split is a hash of (seed, row id), not a permutation of all rows.
Errors name `load_dataset`'s own arguments (`source`, `label`, `features`, `transfer`, `split`); the
orchestrator places them under the workflow's `data:` section. Features are standardized with the
training split's mean and std; the fingerprint covers the rows, the
split and the preprocessing, so any change to them is a new soft-target cache key. The transfer rows (extra
unlabeled rows only the teacher labels) are in `fingerprint` but not in `labeled_fingerprint`: a teacher
trained by the workflow sees only the labeled training split, so adding a transfer set does not retrain it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import UserError
from tasks.pieces import SPLIT_CODES, SPLIT_RULE, Piece, Reader, Reduced, SplitRows, fill, scan
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for

BUILTINS = ("sklearn:digits", "mnist1d")
PREPROCESSING = "standardize-v1"


@dataclass
class Fill:
    """How to read the standardized split arrays from the source's pieces once someone asks for them
    (`Dataset.x`/`Dataset.y`): picklable and small (readers, pieces, the reductions), so a Dataset whose
    consumers read the source themselves never holds its rows (docs/streaming.md)."""

    reader: Reader
    pieces: list[Piece]
    reduced: Reduced
    transfer: tuple[Reader, list[Piece], Reduced] | None
    mean: np.ndarray
    std: np.ndarray
    seed: int
    val: float
    test: float
    threads: int | None

    def __call__(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Each split read again into arrays of its counted size; a piece whose digest is not the reduction's
        raises `SourceChanged`."""
        kw: dict[str, Any] = {"mean": self.mean, "std": self.std, "seed": self.seed, "val": self.val,
                              "test": self.test, "threads": self.threads}
        xs, ys = fill(self.reader, self.pieces, self.reduced, **kw)
        if self.transfer is not None:
            t_reader, t_pieces, t_red = self.transfer
            tx, _ = fill(t_reader, t_pieces, t_red, split=False, **kw)
            xs["transfer"], ys["transfer"] = tx["train"], np.full(t_red.counts["train"], -1, np.int64)
        return xs, ys


@dataclass
class Dataset:
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    fingerprint: str  # every row the soft targets hold, transfer rows included
    labeled_fingerprint: str  # train, val and test only: what a teacher trained here depends on
    # split -> its rows (the reduction's counts; "transfer" only when there are transfer rows): sizes come
    # from here, never from the arrays, so asking a size reads nothing
    counts: dict[str, int] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)  # the user's column names (registered model's input)
    # what another task kind carries beside the rows (causal_lm: the tokenizer, and "meta" for the manifest)
    extra: dict[str, Any] = field(default_factory=dict)
    # split -> its rows readable by row range from a Parquet source's pieces (empty for a built-in): the
    # same rows as x/y, for a reader that should not get them from the driver (soft-target shard tasks)
    source_rows: dict[str, SplitRows] = field(default_factory=dict)
    # the split arrays (x: split -> float32 [N, F] standardized; y: split -> int64 [N], -1 unlabeled
    # transfer rows), given, or read by `filler` the first time `x` or `y` is asked for
    arrays: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
    filler: Fill | None = None
    # the workflow section a late fill's error is named under (orchestrator: "data" -> "data.source")
    where: str = ""

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

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

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


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def feature_columns(schema: Any, features: list[str] | str | None, label: str | None, where: str) -> list[str] | str:
    """The feature column(s) of a table's `schema`: one list/array column, or numeric columns (default: all
    but label)."""
    import pyarrow as pa

    names = schema.names
    if isinstance(features, str):
        if features not in names:
            raise UserError(f"column {features!r} not in the table (columns: {names})", where=_key(where, "features"))
        return features
    if features is None:
        cols = [n for n in names if n != label and (pa.types.is_integer(schema.field(n).type)
                                                     or pa.types.is_floating(schema.field(n).type))]
        if not cols:
            raise UserError("the table has no numeric feature columns", where=_key(where, "features"))
        return cols
    missing = [c for c in features if c not in names]
    if missing:
        raise UserError(f"columns not in the table: {missing} (columns: {names})", where=_key(where, "features"))
    return list(features)


def check_feature_types(schema: Any, cols: list[str] | str, where: str) -> None:
    """Today's type checks on the schema alone (a footer read): numeric columns, or one list column."""
    import pyarrow as pa

    if isinstance(cols, str):
        t = schema.field(cols).type
        if not (pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)):
            raise UserError(f"column {cols!r} is {t}, not a list/array column", where=_key(where, "features"))
        return
    for c in cols:
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise UserError(f"column {c!r} is {t}, not numeric", where=_key(where, "features"))


def table_features(table: Any, features: list[str] | str | None, label: str | None, where: str) -> np.ndarray:
    """Float32 [N, F] features from the columns `feature_columns` picks."""
    cols = feature_columns(table.schema, features, label, where)
    check_feature_types(table.schema, cols, where)
    if isinstance(cols, str):
        col = table.column(cols).combine_chunks()
        if len(col) == 0:
            return np.empty((0, 0), np.float32)
        try:
            return np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
        except ValueError:
            raise UserError(f"column {cols!r} has rows of different lengths", where=_key(where, "features")) from None
    out = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cols]
    return np.stack(out, axis=1) if out else np.empty((table.num_rows, 0), np.float32)


@dataclass
class Listed:
    """A Parquet source as the driver sees it from metadata alone: its pieces (row groups) and schema."""

    url: str
    s3_options: dict[str, Any]
    pieces: list[Piece]
    schema: Any


def list_parquet(source: str, storage: Storage | None, where: str) -> Listed:
    """The files of a Parquet file, folder or glob (local or s3://), sorted, as pieces: one per row group,
    from the footers only. A file's name (its path under the source's root) is part of its rows' ids."""
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
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where=where) from None
    return Listed(source, opts, pieces, schema)


def read_parquet_table(source: str, storage: Storage | None, where: str) -> Any:
    """Read a Parquet file, folder or glob (local or s3://) into one pyarrow Table (language-model documents:
    classification reads its sources piece by piece, `list_parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = list_parquet(source, storage, where)
    fs = filesystem_for(source, listed.s3_options)
    try:
        tables = []
        for f in dict.fromkeys(p.path for p in listed.pieces):
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh))
        return pa.concat_tables(tables, promote_options="default") if tables else listed.schema.empty_table()
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where=where) from None


def _missing_bucket(fs: Any, source: str, where: str) -> None:
    if source.startswith("s3://"):
        bucket = source.removeprefix("s3://").split("/")[0]
        if not fs.exists(bucket):
            raise UserError(f"bucket {bucket!r} does not exist ({source})", where=where)


# A built-in's arrays are read as pieces of this many rows (its row ids are its row indices, so the split
# does not depend on this; the fingerprint does, as it does on a Parquet file's row groups).
BUILTIN_PIECE_ROWS = 65_536


def _array_pieces(n: int) -> list[Piece]:
    return [Piece(name="", path="", row_group=-1, start=a, rows=min(BUILTIN_PIECE_ROWS, n - a))
            for a in range(0, n, BUILTIN_PIECE_ROWS)]


def _limit(pieces: list[Piece], limit: int | None) -> list[Piece]:
    """The first `limit` rows of the source, in piece order (a piece cut short where the limit falls)."""
    if not limit:
        return pieces
    out, left = [], limit
    for p in pieces:
        if left <= 0:
            break
        out.append(p if p.rows <= left else dataclasses.replace(p, rows=left))
        left -= p.rows
    return out


@dataclass
class Sources:
    """The labeled rows and the transfer rows (or None) as readers and pieces, with the class and feature
    names (empty: a built-in's, from its label values / generator)."""

    reader: Reader
    pieces: list[Piece]
    transfer: tuple[Reader, list[Piece]] | None
    names: list[str]


def load_dataset(source: str, *, features: list[str] | str | None = None, label: str = "label",
                 val: float = 0.15, test: float = 0.15, transfer: int | str | None = None, seed: int = 0,
                 limit: int | None = None, storage: Storage | None = None, threads: int | None = None) -> Dataset:
    """Load, split (a hash of seed and row id, tasks/pieces.py) and standardize a dataset, piece by piece:
    a reduction pass (counts, train mean/std, classes, digests). The split arrays are read (`Fill`) the first
    time `Dataset.x`/`.y` is asked for: at once for a built-in, whose rows are in memory anyway; for a Parquet
    source only if a stage needs them (transfer rows, a cluster whose workers cannot open the source), so a
    run whose workers read the pieces (`Dataset.source_rows`) holds metadata only."""
    src = _sources(source, features, label, transfer, storage)
    pieces = _limit(src.pieces, limit)
    red = scan(src.reader, pieces, seed=seed, val=val, test=test, threads=threads)
    _release_arrow_pool()
    if not all(s.finite for s in red.per_piece):
        raise UserError("features contain NaN or infinity", where="features")
    classes = [] if red.classes is None else red.classes.tolist()
    if len(classes) < 2:
        raise UserError(f"need at least 2 classes, found {len(classes)}", where="label")
    n = sum(red.counts.values())
    if red.counts["train"] < 2 or red.counts["test"] < 1:
        raise UserError(f"{n} rows are too few for this split", where="split")
    std64 = np.sqrt(red.var)
    mean = red.mean.astype(np.float32)
    std = np.where(std64 < 1e-6, 1.0, std64).astype(np.float32)

    h = hashlib.sha256()
    h.update(f"{PREPROCESSING}|{SPLIT_RULE}|seed={seed}|val={val}|test={test}|features={src.names}|".encode())
    _hash_pieces(h, pieces, red.digests)
    labeled = h.hexdigest()
    counts = dict(red.counts)
    transfer = None
    if src.transfer is not None:
        t_reader, t_pieces = src.transfer
        t_red = scan(t_reader, t_pieces, seed=seed, val=val, test=test, split=False, threads=threads)
        if t_red.per_piece and t_red.num_features != red.num_features:
            raise UserError(f"transfer rows have {t_red.num_features} features, the data has {red.num_features}",
                            where="transfer")
        if not all(s.finite for s in t_red.per_piece):
            raise UserError("transfer features contain NaN or infinity", where="transfer")
        if t_red.counts["train"]:
            transfer = (t_reader, t_pieces, t_red)
            counts["transfer"] = t_red.counts["train"]
            h.update(b"transfer")
            _hash_pieces(h, t_pieces, t_red.digests)
    names = src.names or _builtin_feature_names(source, red.num_features)
    rows = {} if src.reader.arrays is not None else {
        k: SplitRows(src.reader, k, pieces, [s.counts[k] for s in red.per_piece], red.digests, mean, std,
                     red.classes, red.num_features, seed, val, test) for k in SPLIT_CODES}
    filler = Fill(src.reader, pieces, red, transfer, mean, std, seed, val, test, threads)
    data = Dataset(num_classes=len(classes), mean=mean, std=std, fingerprint=h.hexdigest(),
                   labeled_fingerprint=labeled, counts=counts, classes=classes, feature_names=names,
                   source_rows=rows, filler=filler)
    if not rows:  # a built-in: its rows are in memory already, and every consumer takes its arrays
        data.x  # noqa: B018 - fills them now, where a reading mistake belongs to the data stage
    return data


def _release_arrow_pool() -> None:
    """Give back what pyarrow's pool kept from the last decoded row group (about its size): the reduction is
    done with it, and otherwise it stays under every later stage's peak in the driver."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _hash_pieces(h: Any, pieces: list[Piece], digests: list[str]) -> None:
    for p, d in zip(pieces, digests, strict=True):
        h.update(f"{p.name}|{p.row_group}|{p.start}|{p.rows}|{d}\n".encode())


def _sources(source: str, features: list[str] | str | None, label: str, transfer: int | str | None,
             storage: Storage | None) -> Sources:
    """`source` (and `transfer`) as readers and pieces; every check that metadata allows runs here."""
    if source == "sklearn:digits":
        if transfer is not None:
            raise UserError("sklearn:digits has no generator for transfer rows; give a Parquet source",
                            where="transfer")
        x, y = _digits()
        return Sources(Reader(arrays=(x, y)), _array_pieces(len(y)), None, [])
    if source == "mnist1d":
        if isinstance(transfer, str):
            raise UserError("for mnist1d, transfer is a number of extra generated rows", where="transfer")
        x, y, extra = _mnist1d(int(transfer or 0))
        t = None if extra is None else (Reader(arrays=(extra, None), where="transfer"), _array_pieces(len(extra)))
        return Sources(Reader(arrays=(x, y)), _array_pieces(len(y)), t, [])
    if source.endswith((".parquet", "/")) or "/" in source or source.startswith("s3://") or "*" in source:
        return _parquet(source, features, label, transfer, storage)
    raise UserError(f"unknown source {source!r}: built-ins are {', '.join(BUILTINS)}, or a Parquet "
                    "file/folder/glob (local or s3://)", where="source")


def _parquet(source: str, features: list[str] | str | None, label: str, transfer: Any,
             storage: Storage | None) -> Sources:
    listed = list_parquet(source, storage, "source")
    if label not in listed.schema.names:
        raise UserError(f"label column {label!r} not in the table (columns: {listed.schema.names})", where="label")
    columns = feature_columns(listed.schema, features, label, "")
    check_feature_types(listed.schema, columns, "")
    wanted = [columns] if isinstance(columns, str) else columns
    t = None
    if transfer is not None:
        if not isinstance(transfer, str):
            raise UserError("for a Parquet source, transfer is a Parquet source too (a path or glob)",
                            where="transfer")
        # the same feature columns as the labeled rows, in the same order; other columns are ignored
        tl = list_parquet(transfer, storage, "transfer")
        missing = [c for c in wanted if c not in tl.schema.names]
        if missing:
            raise UserError(f"the transfer rows lack the feature columns {missing} (columns: {tl.schema.names})",
                            where="transfer")
        check_feature_types(tl.schema, columns, "transfer")
        t = (Reader(url=transfer, s3_options=tl.s3_options, columns=columns, where="transfer"), tl.pieces)
    names = [] if isinstance(columns, str) else list(columns)
    reader = Reader(url=source, s3_options=listed.s3_options, columns=columns, label=label)
    return Sources(reader, listed.pieces, t, names)


