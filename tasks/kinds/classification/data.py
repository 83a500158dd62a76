"""Classification's data: built-in generators and the user's Parquet tables of features and a label, split
deterministically, standardized and fingerprinted.

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

from tasks.dataset import Dataset, Listed, list_parquet, list_source, sklearn_digits
from tasks.errors import UserError
from tasks.pieces import (
    SPLIT_CODES,
    SPLIT_RULE,
    Piece,
    Reader,
    Reduced,
    SplitRows,
    check_feature_types,
    column_name,
    feature_columns,
    fill,
    scan,
)
from tasks.splits import Layout, resolve
from tasks.storage import Storage

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


@dataclass(kw_only=True)
class FeatureTable(Dataset):
    """Rows of standardized float32 features [N, F] and a class index each (-1: an unlabeled transfer row)."""

    num_classes: int
    mean: np.ndarray  # the training split's, per feature: what a served model standardizes raw features with
    std: np.ndarray
    classes: list[Any] = field(default_factory=list)  # the user's label values, by class index
    feature_names: list[str] = field(default_factory=list)  # the user's column names (the served model's input)

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])


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


# A built-in's arrays are read as pieces of this many rows (its row ids are its row indices, so the split
# does not depend on this; the fingerprint does, as it does on a Parquet file's row groups).
BUILTIN_PIECE_ROWS = 65_536


def _array_pieces(n: int) -> list[Piece]:
    return [Piece(name="", path="", row_group=-1, start=a, rows=min(BUILTIN_PIECE_ROWS, n - a))
            for a in range(0, n, BUILTIN_PIECE_ROWS)]


def _limit(pieces: list[Piece], limit: int | None) -> list[Piece]:
    """The first `limit` rows of the source, in piece order (a piece cut short where the limit falls); of
    each given split's source, when the splits are given."""
    if not limit:
        return pieces
    if pieces and pieces[0].split:
        groups = {p.split: [q for q in pieces if q.split == p.split] for p in pieces}
        return [p for g in groups.values() for p in _limit_rows(g, limit)]
    return _limit_rows(pieces, limit)


def _limit_rows(pieces: list[Piece], limit: int) -> list[Piece]:
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
    layout: Layout | None = None  # how a source's rows are split (None: a built-in, by fractions)


def load_dataset(source: str, *, features: list[str] | str | None = None, label: str = "label",
                 val: float = 0.15, test: float = 0.15, transfer: int | str | None = None, seed: int = 0,
                 limit: int | None = None, storage: Storage | None = None, threads: int | None = None,
                 splits: dict[str, str] | None = None) -> FeatureTable:
    """Load, split (a hash of seed and row id, tasks/pieces.py) and standardize a dataset, piece by piece:
    a reduction pass (counts, train mean/std, classes, digests). The split arrays are read (`Fill`) the first
    time `Dataset.x`/`.y` is asked for: at once for a built-in, whose rows are in memory anyway; for a Parquet
    source only if a stage needs them (transfer rows, a cluster whose workers cannot open the source), so a
    run whose workers read the pieces (`Dataset.source_rows`) holds metadata only. Splits given (`splits`, or
    a folder's layout: tasks/splits.py) keep their rows; only a single table is cut by the fractions."""
    src = _sources(source, features, label, transfer, storage, splits)
    pieces = _limit(src.pieces, limit)
    red = scan(src.reader, pieces, seed=seed, val=val, test=test, threads=threads)
    _release_arrow_pool()
    bad = next((s.nonfinite for s in red.per_piece if not s.finite), None)
    if bad is not None:
        raise UserError(f"features contain NaN or infinity: {bad}", where="features")
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
    given = src.layout.identity() if src.layout is not None else ""  # "" for one table: today's keys stay
    h.update(f"{PREPROCESSING}|{SPLIT_RULE}|seed={seed}|val={val}|test={test}|{given}features={src.names}|".encode())
    _hash_pieces(h, pieces, red.digests)
    labeled = h.hexdigest()
    counts = dict(red.counts)
    transfer_rows = _scan_transfer(src, red, h, counts, seed=seed, val=val, test=test, threads=threads)
    names = _feature_names(src, source, red.num_features)
    rows = {} if src.reader.arrays is not None else {
        k: SplitRows(src.reader, k, pieces, [s.counts[k] for s in red.per_piece], red.digests, mean, std,
                     red.classes, red.num_features, seed, val, test) for k in SPLIT_CODES}
    filler = Fill(src.reader, pieces, red, transfer_rows, mean, std, seed, val, test, threads)
    data = FeatureTable(num_classes=len(classes), mean=mean, std=std, fingerprint=h.hexdigest(),
                   labeled_fingerprint=labeled, counts=counts, classes=classes, feature_names=names,
                   source_rows=rows, filler=filler)
    data.sources = _split_uris(source, src.layout, counts, transfer=None if src.transfer is None else
                               (transfer if isinstance(transfer, str) else f"{source} (generated)"))
    data.columns = {**dict.fromkeys(names, "float"), label: "string" if isinstance(classes[0], str) else "long"}
    if not rows:  # a built-in: its rows are in memory already, and every consumer takes its arrays
        data.x  # noqa: B018 - fills them now, where a reading mistake belongs to the data stage
    return data


def _scan_transfer(src: Sources, red: Reduced, h: Any, counts: dict[str, int], *, seed: int, val: float,
                   test: float, threads: int | None) -> tuple[Reader, list[Piece], Reduced] | None:
    """The transfer rows' reduction (None without any), checked against the labeled rows', hashed into `h` and
    counted into `counts`."""
    if src.transfer is None:
        return None
    t_reader, t_pieces = src.transfer
    t_red = scan(t_reader, t_pieces, seed=seed, val=val, test=test, split=False, threads=threads)
    if t_red.per_piece and t_red.num_features != red.num_features:
        raise UserError(f"transfer rows have {t_red.num_features} features, the data has {red.num_features}",
                        where="transfer")
    bad = next((s.nonfinite for s in t_red.per_piece if not s.finite), None)
    if bad is not None:
        raise UserError(f"transfer features contain NaN or infinity: {bad}", where="transfer")
    if not t_red.counts["train"]:
        return None
    counts["transfer"] = t_red.counts["train"]
    h.update(b"transfer")
    _hash_pieces(h, t_pieces, t_red.digests)
    return t_reader, t_pieces, t_red


def _feature_names(src: Sources, source: str, n: int) -> list[str]:
    """The user's names of the features: its columns; a list/array column's as emb[0], emb[1], ... (in reports
    and the served model's signature); a built-in's own."""
    listed = src.reader.columns if isinstance(src.reader.columns, str) else None
    return src.names or ([column_name(listed, i) for i in range(n)] if listed else _builtin_feature_names(source, n))


def _split_uris(source: str, layout: Layout | None, counts: dict[str, int], transfer: str | None) -> dict[str, str]:
    """Where each split's rows come from (the run's lineage): its given source, else the one table."""
    out = {k: source for k in counts}
    if layout is not None and layout.given:
        out = {k: layout.sources.get(k, layout.sources["train"]).uri for k in counts}
    elif layout is not None and layout.table is not None:
        out = dict.fromkeys(counts, layout.table.uri)
    if transfer is not None:
        out["transfer"] = transfer
    return out


def _release_arrow_pool() -> None:
    """Give back what pyarrow's pool kept from the last decoded row group (about its size): the reduction is
    done with it, and otherwise it stays under every later stage's peak in the driver."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _hash_pieces(h: Any, pieces: list[Piece], digests: list[str]) -> None:
    for p, d in zip(pieces, digests, strict=True):
        h.update(f"{p.name}|{p.row_group}|{p.start}|{p.rows}|{d}\n".encode())


def _sources(source: str, features: list[str] | str | None, label: str, transfer: int | str | None,
             storage: Storage | None, splits: dict[str, str] | None = None) -> Sources:
    """`source` (and `transfer`) as readers and pieces; every check that metadata allows runs here."""
    if splits:
        return _parquet(resolve(source, splits, storage), features, label, transfer, storage)
    if source == "sklearn:digits":
        if transfer is not None:
            raise UserError("sklearn:digits has no generator for transfer rows; give a Parquet source",
                            where="transfer")
        x, y = sklearn_digits()
        return Sources(Reader(arrays=(x, y)), _array_pieces(len(y)), None, [])
    if source == "mnist1d":
        if isinstance(transfer, str):
            raise UserError("for mnist1d, transfer is a number of extra generated rows", where="transfer")
        x, y, extra = _mnist1d(int(transfer or 0))
        t = None if extra is None else (Reader(arrays=(extra, None), where="transfer"), _array_pieces(len(extra)))
        return Sources(Reader(arrays=(x, y)), _array_pieces(len(y)), t, [])
    if source.endswith((".parquet", "/")) or "/" in source or source.startswith("s3://") or "*" in source \
            or os.path.isdir(source):
        return _parquet(resolve(source, None, storage), features, label, transfer, storage)
    raise UserError(f"unknown source {source!r}: built-ins are {', '.join(BUILTINS)}, or a Parquet "
                    "file/folder/glob (local or s3://)", where="source")


def _listed(layout: Layout, storage: Storage | None) -> list[Listed]:
    """Each split source's listing (one for a single table)."""
    srcs = list(layout.sources.values()) if layout.given else [layout.table]
    return [list_source(s, storage, layout.carves_val) for s in srcs if s is not None]


def _parquet(layout: Layout, features: list[str] | str | None, label: str, transfer: Any,
             storage: Storage | None) -> Sources:
    listings = _listed(layout, storage)
    listed, where = listings[0], (next(iter(layout.sources.values())).where if layout.given else "source")
    source = listed.url
    if label not in listed.schema.names:
        raise UserError(f"label column {label!r} not in the table (columns: {listed.schema.names})", where="label")
    columns = feature_columns(listed.schema, features, label, "")
    check_feature_types(listed.schema, columns, "")
    wanted = [columns] if isinstance(columns, str) else columns
    for other, src in zip(listings[1:], list(layout.sources.values())[1:], strict=True):
        lacking = [c for c in [*wanted, label] if c not in other.schema.names]
        if lacking:
            raise UserError(f"the {src.split} split lacks the columns {lacking} (columns: {other.schema.names})",
                            where=src.where)
        check_feature_types(other.schema, columns, src.where)
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
        t = (Reader(url=transfer, s3_options=tl.s3_options, columns=columns, where="transfer",
                    retries=tl.retries), tl.pieces)
    names = [] if isinstance(columns, str) else list(columns)
    reader = Reader(url=source, s3_options=listed.s3_options, columns=columns, label=label, where=where,
                    retries=listed.retries)
    return Sources(reader, [p for x in listings for p in x.pieces], t, names, layout)


