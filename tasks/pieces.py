"""A source as pieces (Parquet row groups, or a built-in's arrays), a hash split, and a reduction over pieces.

A row's id is (the name of its file under the source's root, its row index in that file); a built-in's rows
have the name "" and their row index. Its split is a hash of (seed, row id) against the val/test fractions, so
any reader of any row range decides the split of its own rows, and a file added to the source moves no old
row between splits (docs/streaming.md, steps 1-2).

`scan_piece` is the per-piece half of the reduction: per-split row counts, the train split's per-feature
mean and M2 (float64, merged with Chan's parallel formula), the label values seen and a sha256 of the
piece's bytes as read. It takes only picklable arguments, so a Ray task can run it as well as the local
thread pool `scan` uses; `fill` reads each piece again into preallocated split arrays and checks its
digest, so a file that changed between the two reads is an error, not a silent mix. `SplitRows` is one
split readable by row range the same way, for a reader that should not get its rows from the driver (the
teacher's training worker); `piece_rows` reads one piece once for every split's rows of it (the
soft-target tasks).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.errors import UserError
from tasks.retry import Retries

SPLIT_RULE = "hash-splitmix64-v1"  # bump when split_codes changes: it is part of the fingerprint
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# rows turned into numpy arrays at once; pyarrow still decodes a Parquet row group's pages into its own
# pool, so a reader's window is about one row group (times the pieces read side by side)
CHUNK_ROWS = 65_536


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



@dataclass(frozen=True)
class Piece:
    """Rows [start, start + rows) of one file (`row_group` of it), or of a built-in's arrays (row_group -1)."""

    name: str  # the file's name under the source's root: part of every row id in it ("" for a built-in)
    path: str  # what the filesystem opens
    row_group: int
    start: int  # the row index in the file of the piece's first row
    rows: int  # fewer than group_rows where a `limit` ends the source inside the row group
    group_rows: int = 0  # the row group's rows per the footer the listing read
    # "" : its rows are split by the hash of their ids; a split name: every row is in that given split;
    # tasks.splits.CARVE_VAL: a given training split whose val rows the hash cuts out (test fraction 0)
    split: str = ""

    @property
    def arrow(self) -> bool:
        """An Arrow IPC stream file (a `save_to_disk` folder's), read whole as one piece, not a row group."""
        return self.path.endswith(".arrow")


@dataclass
class Reader:
    """How to read a piece's features (float32 [n, F]) and labels: picklable, so a Ray task can take it.

    `arrays` holds a built-in's (x, y) in memory; otherwise pieces are Parquet row groups read through
    `filesystem_for(url, s3_options)` with `columns` (one list column, or numeric columns) and `label`."""

    url: str = ""
    s3_options: dict[str, Any] = field(default_factory=dict)
    columns: list[str] | str = field(default_factory=list)
    label: str | None = None
    arrays: tuple[np.ndarray, np.ndarray | None] | None = None
    where: str = "source"
    retries: Retries = field(default_factory=Retries)  # an S3 outage mid-read (storage.retries)

    def chunks(self, piece: Piece) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """The piece's rows as (offset in the piece, float32 features, labels or None), at most CHUNK_ROWS at
        a time, so a reader holds a bounded window whatever the source's row-group size."""
        if self.arrays is not None:
            x, y = self.arrays
            for a in range(0, piece.rows, CHUNK_ROWS):
                b = min(piece.rows, a + CHUNK_ROWS)
                yield a, x[piece.start + a:piece.start + b], None if y is None else y[piece.start + a:piece.start + b]
            return
        import pyarrow as pa

        from tasks.retry import retried_stream
        from tasks.storage import S3_ERRORS, describe_s3_error

        try:
            if self.url.startswith("s3://"):  # an S3 outage mid-piece: wait, then go on from the last chunk
                yield from retried_stream(lambda n: self._chunks_from(piece, n), service="S3",
                                          retries=self.retries, where=self.where)
            else:
                yield from self._chunks_from(piece, 0)
        except (*S3_ERRORS, pa.ArrowException) as exc:
            raise UserError(f"cannot read {'Arrow' if piece.arrow else 'Parquet'} from {self.url}: "
                            f"{describe_s3_error(exc)}", where=self.where) from None

    def _chunks_from(self, piece: Piece, skip: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """`chunks` of a file's piece, from its `skip`-th chunk on (the ones before are read, not decoded)."""
        from tasks.storage import filesystem_for

        fs = filesystem_for(self.url, self.s3_options)
        cols = ([self.columns] if isinstance(self.columns, str) else list(self.columns))
        cols += [self.label] if self.label else []
        at = 0
        for n, table in enumerate(self._tables(fs, piece, cols)):
            if at >= piece.rows:  # a `limit` can end a source inside a row group
                break
            table = table.slice(0, piece.rows - at)
            if n >= skip:
                x = table_features(table, self.columns, self.label, "")
                labels = table.column(self.label).to_numpy(zero_copy_only=False) if self.label else None
                yield at, x, None if labels is None else whole_labels(labels, self.label)
            at += table.num_rows

    def _tables(self, fs: Any, piece: Piece, cols: list[str]) -> Iterator[Any]:
        """The piece's columns `cols` as tables of at most CHUNK_ROWS rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        remote = self.url.startswith("s3://")
        if piece.arrow:
            yield from arrow_tables(fs, piece, cols, remote, self.where)
            return
        with fs.open(piece.path, "rb") as f:
            # page by page, not whole column chunks: pyarrow's pre-buffering (on by default) reads the row
            # group's chunks whole first, 264 MB against 142 MB without for a 1M-row group of 33 float
            # columns, and no faster from local disk. On S3 it stays on: it coalesces the ranged GETs.
            pf = pq.ParquetFile(f, buffer_size=1 << 20 if remote else 1 << 16, pre_buffer=remote)
            if piece.row_group >= pf.num_row_groups \
                    or pf.metadata.row_group(piece.row_group).num_rows != piece.group_rows:
                raise SourceChanged(piece, self.where)
            for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=[piece.row_group], columns=cols,
                                         use_threads=False):
                yield pa.Table.from_batches([batch])


def open_arrow(fs: Any, path: str, remote: bool) -> Any:
    """An Arrow IPC file as pyarrow reads it without a copy: memory-mapped when local."""
    import pyarrow as pa

    return fs.open(path, "rb") if remote else pa.memory_map(path)


def arrow_tables(fs: Any, piece: Piece, cols: list[str], remote: bool, where: str) -> Iterator[Any]:
    """An Arrow IPC stream file's record batches (`cols` only) joined into tables of about CHUNK_ROWS rows, read
    one batch at a time (memory-mapped locally: nothing is copied before a chunk is decoded); a file whose row
    count is not the listing's raises `SourceChanged`."""
    import pyarrow as pa

    with open_arrow(fs, piece.path, remote) as f:
        held: list[Any] = []
        n = seen = 0
        for batch in pa.ipc.open_stream(f):
            held.append(batch.select(cols))
            n += batch.num_rows
            seen += batch.num_rows
            if n >= CHUNK_ROWS:
                yield pa.Table.from_batches(held)
                held, n = [], 0
        if held:
            yield pa.Table.from_batches(held)
    if seen != piece.group_rows:
        raise SourceChanged(piece, where)


def whole_labels(labels: np.ndarray, label: str | None) -> np.ndarray:
    """Float class labels that are whole numbers (1.0, 2.0: a Parquet writer's NaN-capable ints) as int64; a
    fractional or infinite one is refused naming the column (missing ones are `_check_labels`' to name)."""
    if labels.dtype.kind != "f" or np.isnan(labels).any():
        return labels
    whole = np.isfinite(labels) & (labels == np.round(labels))
    if not whole.all():
        raise UserError(f"label column {label!r} holds {float(labels[~whole][0])}: a class label is a whole number or "
                        "a string (a fractional target is regression, not classification)", where="label")
    return labels.astype(np.int64)


def column_name(columns: list[str] | str, i: int) -> str:
    """The user's name of feature `i`: a numeric column's, `emb[i]` of a list column, `feature i` of a built-in."""
    if isinstance(columns, str):
        return f"{columns}[{i}]"
    return columns[i] if i < len(columns) else f"feature {i}"


class SourceChanged(UserError):
    """A piece's rows are not what the reduction pass read (another row count, another digest)."""

    def __init__(self, piece: Piece, where: str = "source") -> None:
        super().__init__(f"{piece.name or 'the data'} (row group {piece.row_group}) changed while this run read it",
                         where=where)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_codes(name: str, start: int, rows: int, *, seed: int, val: float, test: float) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of rows [start, start + rows) of the file `name`: a 64-bit hash
    of (seed, name, row index) as a uniform number in [0, 1), test below `test`, val below `test + val`."""
    base = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        h = _splitmix64(np.arange(start, start + rows, dtype=np.uint64) ^ base)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    codes = np.zeros(rows, dtype=np.int8)
    codes[u < test + val] = SPLIT_CODES["val"]
    codes[u < test] = SPLIT_CODES["test"]
    return codes


@dataclass
class PieceStats:
    """What one piece contributes to the reduction (small: O(features + classes))."""

    counts: dict[str, int]
    mean: np.ndarray  # float64 [F]: the train rows' mean
    m2: np.ndarray  # float64 [F]: the train rows' sum of squared deviations from it
    labels: np.ndarray | None  # the distinct label values of all its rows (None: an unlabeled source)
    digest: str
    finite: bool
    num_features: int
    nonfinite: str = ""  # where the first NaN or infinite feature value is: its column, row id and value


def _chan(n: int, mean: np.ndarray, m2: np.ndarray, nb: int, mean_b: np.ndarray, m2_b: np.ndarray,
          ) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel merge of two (count, mean, M2) summaries (float64)."""
    if nb == 0:
        return n, mean, m2
    total = n + nb
    delta = mean_b - mean
    return total, mean + delta * (nb / total), m2 + m2_b + delta ** 2 * (n * nb / total)


class Digest:
    """sha256 of a piece's features (float32, as read) and labels, fed chunk by chunk: the same for any
    chunking of the same rows, and any change to a row changes it."""

    def __init__(self) -> None:
        self.x, self.y = hashlib.sha256(), hashlib.sha256()
        self.kind = ""

    def update(self, x: np.ndarray, labels: np.ndarray | None) -> None:
        self.x.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
        if labels is None:
            return
        self.kind = self.kind or ("object" if labels.dtype == object else labels.dtype.str)
        if labels.dtype == object:
            self.y.update("".join(f"{v!r}\x1f" for v in labels.tolist()).encode())
        else:
            self.y.update(np.ascontiguousarray(labels).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.x.hexdigest()}|{self.kind}|{self.y.hexdigest()}".encode()).hexdigest()


def _check_labels(labels: np.ndarray, label: str | None) -> None:
    if any(v is None for v in labels) if labels.dtype == object else (labels.dtype.kind == "f" and np.isnan(labels).any()):
        raise UserError(f"label column {label!r} has missing values", where="label")


def _codes(piece: Piece, offset: int, rows: int, split: bool, **fractions: Any) -> np.ndarray:
    """The split of each of a piece's rows: its given split, else the hash's (`split` False: all train)."""
    if not split:
        return np.zeros(rows, np.int8)
    if piece.split in SPLIT_CODES:
        return np.full(rows, SPLIT_CODES[piece.split], np.int8)
    if piece.split:  # a given training split, its val rows cut out by the val fraction (tasks.splits.CARVE_VAL)
        fractions = {**fractions, "test": 0.0}
    return split_codes(piece.name, piece.start + offset, rows, **fractions)


def scan_piece(reader: Reader, piece: Piece, *, seed: int, val: float, test: float, split: bool = True) -> PieceStats:
    """One piece's share of the reduction; `split` False puts all its rows in "train" (transfer rows)."""
    counts = dict.fromkeys(SPLIT_CODES, 0)
    n, mean, m2, width = 0, np.zeros(0), np.zeros(0), None
    seen: list[np.ndarray] = []
    digest, finite, nonfinite = Digest(), True, ""
    for offset, x, labels in reader.chunks(piece):
        if width is None:
            width, mean, m2 = x.shape[1], np.zeros(x.shape[1]), np.zeros(x.shape[1])
        elif x.shape[1] != width:
            raise UserError(f"rows have {x.shape[1]} and {width} features", where="features")
        if finite and not np.isfinite(x).all():
            finite, nonfinite = False, _nonfinite(reader, piece, offset, x)
        codes = _codes(piece, offset, len(x), split, seed=seed, val=val, test=test)
        for k, c in SPLIT_CODES.items():
            counts[k] += int((codes == c).sum())
        train = x[codes == 0].astype(np.float64)
        if len(train) and finite:  # a NaN makes the load fail (naming it): no statistics of it
            mb = train.mean(axis=0)
            n, mean, m2 = _chan(n, mean, m2, len(train), mb, ((train - mb) ** 2).sum(axis=0))
        if labels is not None:
            _check_labels(labels, reader.label)
            seen.append(np.unique(labels))
        digest.update(x, labels)
    labels_seen = np.unique(np.concatenate(seen)) if seen else None
    return PieceStats(counts, mean, m2, labels_seen, digest.hexdigest(), finite, width or 0, nonfinite)


def _nonfinite(reader: Reader, piece: Piece, offset: int, x: np.ndarray) -> str:
    """`column 'f1' is nan at row 17 of part-0.parquet`: the first NaN or infinite value of a chunk."""
    r, c = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
    where = f" of {piece.name}" if piece.name else ""
    return f"column {column_name(reader.columns, c)!r} is {x[r, c]} at row {piece.start + offset + r}{where}"


@dataclass
class Reduced:
    """The merged reduction: per-split counts, mean/std of the train split, the class values, the digests."""

    counts: dict[str, int]
    mean: np.ndarray  # float64
    var: np.ndarray  # float64, population variance (ddof 0, as numpy's std)
    classes: np.ndarray | None
    digests: list[str]
    per_piece: list[PieceStats]
    num_features: int


def merge(stats: list[PieceStats]) -> Reduced:
    """The per-piece summaries merged in piece order: counts added, train mean/M2 by Chan's formula."""
    widths = {s.num_features for s in stats}
    if len(widths) > 1:
        raise UserError(f"rows have different numbers of features ({sorted(widths)})", where="features")
    num_features = widths.pop() if widths else 0
    n, mean, m2 = 0, np.zeros(num_features), np.zeros(num_features)
    counts = dict.fromkeys(SPLIT_CODES, 0)
    for s in stats:
        for k, v in s.counts.items():
            counts[k] += v
        n, mean, m2 = _chan(n, mean, m2, s.counts["train"], s.mean, s.m2)
    seen = [s.labels for s in stats if s.labels is not None]
    classes = np.unique(np.concatenate(seen)) if seen else None
    var = m2 / n if n else np.zeros(num_features)
    return Reduced(counts, mean, var, classes, [s.digest for s in stats], stats, num_features)


def default_threads(reader: Reader) -> int:
    """Pieces read side by side: one for local files (a row group decoded is the window, and on local disk
    two threads were no faster: docs/streaming.md), a few for S3, where each read waits on the network."""
    return min(4, os.cpu_count() or 1) if reader.url.startswith("s3://") else 1


def _pool_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> list[Any]:
    """`fn` over `items` in order on `threads` threads (pyarrow and numpy release the GIL): at most
    `threads` pieces in memory at once."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def scan(reader: Reader, pieces: list[Piece], *, seed: int, val: float, test: float,
         split: bool = True, threads: int | None = None) -> Reduced:
    """The reduction over every piece (a local pass in bounded memory; each call is a Ray task's worth)."""
    stats = _pool_map(lambda p: scan_piece(reader, p, seed=seed, val=val, test=test, split=split), pieces,
                      threads or default_threads(reader))
    return merge(stats)


def _checked_chunks(reader: Reader, piece: Piece, digest: str, *, split: bool, seed: int, val: float, test: float,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """A piece's chunks as (split codes, features, labels), read again; after the last, its digest is checked
    against the reduction's, so a file changed since then raises `SourceChanged` before its rows are used."""
    seen = Digest()
    for offset, x, lab in reader.chunks(piece):
        seen.update(x, lab)
        yield _codes(piece, offset, len(x), split, seed=seed, val=val, test=test), x, lab
    if seen.hexdigest() != digest:
        raise SourceChanged(piece, reader.where)


def _standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> None:
    """(x - mean) / std in float32 into `out`: one function, so every reader of a row gets the same bits."""
    np.subtract(x, mean, out=out)
    out /= std


def fill(reader: Reader, pieces: list[Piece], reduced: Reduced, *, mean: np.ndarray, std: np.ndarray, seed: int,
         val: float, test: float, split: bool = True, threads: int | None = None,
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each split's standardized float32 features and int64 class indices (-1: no label), in piece order then
    row order, read piece by piece into arrays of the sizes the reduction counted, so the source is never
    held whole beside a copy of it.

    Each piece's digest is checked against the reduction's: a file changed in between raises `SourceChanged`.
    """
    names = list(SPLIT_CODES) if split else ["train"]
    xs = {k: np.empty((reduced.counts[k], reduced.num_features), np.float32) for k in names}
    ys = {k: np.full(reduced.counts[k], -1, np.int64) for k in names}
    offsets: list[dict[str, int]] = []
    at = dict.fromkeys(SPLIT_CODES, 0)
    for s in reduced.per_piece:
        offsets.append(dict(at))
        for k, v in s.counts.items():
            at[k] += v
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)

    def one(i: int) -> None:
        at = dict(offsets[i])
        for codes, x, lab in _checked_chunks(reader, pieces[i], reduced.digests[i], split=split, seed=seed,
                                             val=val, test=test):
            for k in names:
                mask = codes == SPLIT_CODES[k]
                a, b = at[k], at[k] + int(mask.sum())
                _standardize(x[mask], mean32, std32, xs[k][a:b])
                if lab is not None and reduced.classes is not None:
                    ys[k][a:b] = np.searchsorted(reduced.classes, lab[mask])
                at[k] = b

    _pool_map(one, range(len(pieces)), threads or default_threads(reader))
    return xs, ys


@dataclass
class SplitRows:
    """One split of a source, readable by row range: rows [a, b) of the split are its rows in piece order (as
    `fill` lays them out), read from the pieces they lie in, standardized with the merged statistics and
    checked against the reduction's digests by whoever calls `rows` (a soft-target shard task, the teacher's
    training worker through `tasks.train.SourceRows`), not the driver. Small and picklable: a Ray task takes it instead of the split's arrays."""

    reader: Reader
    split: str
    pieces: list[Piece]
    counts: list[int]  # this split's rows in each piece
    digests: list[str]
    mean: np.ndarray  # float32
    std: np.ndarray  # float32
    classes: np.ndarray | None
    num_features: int
    seed: int
    val: float
    test: float

    def __len__(self) -> int:
        return int(sum(self.counts))

    def _overlaps(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """(piece index, the split's index of that piece's first row of this split) of each piece that holds
        some of the split's rows [a, b) (none for an empty range)."""
        if a >= b:
            return
        first = 0
        for i, n in enumerate(self.counts):
            if first >= b:
                return
            if first + n > a:
                yield i, first
            first += n

    def ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """[a, b) cut where one piece's rows of this split end: each part is read from one piece, once."""
        return [(max(a, first), min(b, first + self.counts[i])) for i, first in self._overlaps(a, b)]

    def rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Standardized float32 features and int64 class indices of the split's rows [a, b)."""
        x = np.empty((b - a, self.num_features), np.float32)
        y = np.full(b - a, -1, np.int64)
        for at, xc, yc in self.chunks(a, b):
            x[at:at + len(xc)], y[at:at + len(yc)] = xc, yc
        return x, y

    def chunks(self, a: int, b: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The split's rows [a, b) as (offset from a, standardized features, class indices), at most a read
        chunk at a time. A piece's digest is checked after its last chunk: a caller that uses rows only once
        the iteration has ended (or reached past the piece) never uses rows that fail it."""
        for i, at in self._overlaps(a, b):
            for codes, xc, lab in _checked_chunks(self.reader, self.pieces[i], self.digests[i], split=True,
                                                  seed=self.seed, val=self.val, test=self.test):
                mask, k, lo, hi = self._in_chunk(codes, at, a, b)
                if lo < hi:
                    x = np.empty((hi - lo, self.num_features), np.float32)
                    y = np.full(hi - lo, -1, np.int64)
                    self._fill(xc, lab, mask, at, lo, hi, x, y)
                    yield lo - a, x, y
                at += k

    def first(self, i: int) -> int:
        """The split's index of piece `i`'s first row of this split."""
        return int(sum(self.counts[:i]))

    def _in_chunk(self, codes: np.ndarray, at: int, a: int, b: int) -> tuple[np.ndarray, int, int, int]:
        """For a read chunk whose first row of this split has the split index `at`: the mask of this split's
        rows in it, their count, and the split indices [lo, hi) of those that lie in [a, b)."""
        mask = codes == SPLIT_CODES[self.split]
        k = int(mask.sum())
        return mask, k, max(a, at), min(b, at + k)

    def _fill(self, xc: np.ndarray, lab: np.ndarray | None, mask: np.ndarray, at: int, lo: int, hi: int,
              x: np.ndarray, y: np.ndarray) -> None:
        """The chunk's rows [lo, hi) of this split (`_in_chunk`), standardized into `x` and their class
        indices into `y` (each of hi - lo rows)."""
        _standardize(xc[mask][lo - at:hi - at], self.mean, self.std, x)
        if lab is not None and self.classes is not None:
            y[:] = np.searchsorted(self.classes, lab[mask][lo - at:hi - at])


def piece_rows(splits: dict[str, SplitRows], i: int, want: dict[str, tuple[int, int]],
               ) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Piece `i` read once for every split: for each split in `want`, its rows [a, b) (split indices, within
    the piece's rows of that split) as (a, standardized features, class indices), the same bits as
    `SplitRows.rows` gives. The piece's digest is checked after its last chunk, before anything is returned.
    The splits must be one source's (the same reader, pieces and digests)."""
    any_split = next(iter(splits.values()))
    first = {k: splits[k].first(i) for k in want}
    out = {k: (np.empty((b - a, any_split.num_features), np.float32), np.full(b - a, -1, np.int64))
           for k, (a, b) in want.items()}
    at = dict(first)
    for codes, xc, lab in _checked_chunks(any_split.reader, any_split.pieces[i], any_split.digests[i], split=True,
                                          seed=any_split.seed, val=any_split.val, test=any_split.test):
        for k, (a, b) in want.items():
            mask, n, lo, hi = splits[k]._in_chunk(codes, at[k], a, b)
            if lo < hi:
                splits[k]._fill(xc, lab, mask, at[k], lo, hi, out[k][0][lo - a:hi - a], out[k][1][lo - a:hi - a])
            at[k] += n
    return {k: (a, *out[k]) for k, (a, _) in want.items()}
