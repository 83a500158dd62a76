"""Filling the store: the teacher's forward over every split, written as shards, the manifest last.

A precompute lays out each split's files (`soft_targets.shards` ranges for train, one per SHARD_ROWS rows
for val and test, each cut into files of at most SHARD_ROWS rows / ~SHARD_BYTES), keeps the whole files a
killed run left, and computes the rest: from the split arrays, a Ray task per range of a split; from a
Parquet source (`SplitRows` for every split), units of whole pieces, each reading its pieces once for all
three splits, with a file that crosses two units joined from their parts by one more task. A small
precompute runs on the run's warm actor instead (`runner`), one call after another. Failures are
collected so that every shard that can be written is, then raised together; the manifest is written only
when every shard is (tasks/store/store.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tasks.errors import ShardFailed, UserError, user_error_in
from tasks.kinds.base import TaskKind
from tasks.pieces import SplitRows, piece_rows
from tasks.storage import Storage, sha256_bytes
from tasks.store.formats import TORCH_DTYPES
from tasks.store.shards import encode_rows, shard_schema_problem
from tasks.store.store import MANIFEST_VERSION, SPLITS, SoftTargetStore, shard_name, shard_ranges

log = logging.getLogger(__name__)

# Every shard file holds at most SHARD_ROWS rows and about SHARD_BYTES stored bytes, whatever the split's size
# or `soft_targets.shards` (which sets how many tasks compute train, each writing its range as files of this
# bound): a shard is the unit a worker reads, verifies and decodes at once (tasks/train/stream.py), a streamed
# evaluation holds (tasks/evaluation.py) and a task holds between its forward and its write, so all three
# stay the same at any size. val and test get one task per SHARD_ROWS rows.
SHARD_ROWS = 50_000
SHARD_BYTES = 16 * 2**20

# A shard runner: called with `compute_shards`' positional arguments (teachers, x and y as Ray object refs),
# it computes and writes the shards somewhere (the run's warm actor) and returns their entries, or raises.
ShardRunner = Callable[..., list[dict[str, Any]]]
OnShard = Callable[[str, int, int, bool], None]


@dataclass(frozen=True)
class Encoding:
    """How the teachers' outputs become stored rows: whose forward (the kind's), and the format, dtype, top-k
    and ensemble rule of the stored targets (which the entry's key hashes)."""

    kind: TaskKind
    format: str
    dtype: str
    top_k: int | None  # the ids kept per row: k for topk, the draws N for sampled
    ensemble: str

    def kept(self) -> dict[str, int | None]:
        """What the manifest says of the kept ids: top_k (None but for topk), and samples for sampled."""
        return {"top_k": self.top_k if self.format == "topk" else None,
                **({"samples": self.top_k} if self.format == "sampled" else {})}

    def write(self, storage: Storage, path: str, row_id_start: int, xs: np.ndarray, ys: np.ndarray,
              teachers: list[torch.nn.Module], t0: float) -> dict[str, Any]:
        """One file: the teachers' forward over its rows, encoded and written whole; its manifest entry."""
        logits = self.kind.teacher_outputs(teachers, xs, self.ensemble)
        n = len(ys)
        data = encode_rows(np.arange(row_id_start, row_id_start + n), xs, ys, logits, self.format, self.dtype,
                           self.top_k)
        del logits
        storage.write_bytes(path, data)
        return {"rows": n, "bytes": len(data), "sha256": sha256_bytes(data), "forward_rows": n,
                "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class PrecomputeStats:
    """What one `precompute` call did; not saved (the manifest is what is saved, and says what is stored)."""

    reused: bool  # a complete entry was there: no teacher forward at all
    computed_shards: int
    forward_rows: int  # rows the teacher(s) ran on in this call


def row_bytes(x: Any, y: Any, width: int, format: str, dtype: str, top_k: int | None) -> int:
    """About what one row takes stored (before compression): its inputs, label(s) and teacher targets over
    `width` classes. A sequence row (labels [n, S]) has per-token targets."""
    features = x.num_features if isinstance(x, SplitRows) else int(np.prod(x.shape[1:], dtype=np.int64))
    tokens = int(y.shape[1]) if getattr(y, "ndim", 1) == 2 else 1
    per_value = TORCH_DTYPES[dtype].itemsize
    targets = width * per_value if format == "logits" else int(top_k or 1) * 5 if format == "sampled" \
        else int(top_k or 1) * (per_value + 4) + 4
    return 8 + features * 4 + tokens * (8 + targets)


def file_cuts(a: int, b: int, max_rows: int) -> list[tuple[int, int]]:
    """[a, b) cut into as few equal files as keep each at most `max_rows` rows."""
    return [(a + lo, a + hi) for lo, hi in shard_ranges(b - a, -(-(b - a) // max(1, max_rows)))]


# ---------------------------------------------------------------- the work of one Ray task or warm call


def _rows_by_file(x: np.ndarray, y: np.ndarray, files: list[tuple[str, int, int]],
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each file's rows (features, labels) of a split's arrays, in order."""
    for _, a, b in files:
        yield x[a:b], y[a:b]


@dataclass(frozen=True)
class Job:
    """One thing a unit does with a split's rows [a, b): write them as the file `path` (row ids from
    `row_id_offset + a`), or, with no path, hand them back as a part of a file that crosses the unit's edge."""

    split: str
    a: int
    b: int
    path: str | None
    row_id_offset: int


def _take(held: list[tuple[int, np.ndarray, np.ndarray]], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [(x[max(a, lo) - lo:min(b, lo + len(y)) - lo], y[max(a, lo) - lo:min(b, lo + len(y)) - lo])
             for lo, x, y in held if lo < b and lo + len(y) > a]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _wanted(splits: dict[str, SplitRows], pending: dict[str, deque], i: int) -> dict[str, tuple[int, int]]:
    """Each split's rows of piece `i` that the unit's pending jobs still need."""
    want = {}
    for s, q in pending.items():
        first = splits[s].first(i)
        lo, hi = max(first, q[0][1].a) if q else 0, min(first + splits[s].counts[i], q[-1][1].b) if q else 0
        if lo < hi:
            want[s] = (lo, hi)
    return want


def compute_unit(enc: Encoding, storage: Storage, jobs: list[Job], teachers: list[torch.nn.Module],
                 splits: dict[str, SplitRows]) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray]]]:
    """A unit's jobs over every split of a source, reading each piece they touch once (`piece_rows`: all
    splits' rows of it from one read, its digest checked before any is used), in piece order. A file is
    written as soon as its last piece is read, so what is held is at most one piece's rows of the splits
    and one file's. Returns the written files' entries and the parts (features, labels), each in job order."""
    pending = {s: deque((k, j) for k, j in enumerate(jobs) if j.split == s) for s in SPLITS if s in splits}
    needed = sorted({i for j in jobs for i, _ in splits[j.split]._overlaps(j.a, j.b)})
    held: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {s: [] for s in pending}
    written: dict[int, dict[str, Any]] = {}  # job index -> its file's entry (files finish in piece order)
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    t0 = time.perf_counter()
    for i in needed:
        for s, (lo, xs, ys) in piece_rows(splits, i, _wanted(splits, pending, i)).items():
            held[s].append((lo, xs, ys))
        for s, q in pending.items():
            end = splits[s].first(i) + splits[s].counts[i]
            while q and q[0][1].b <= end:
                k, job = q.popleft()
                xs, ys = _take(held[s], job.a, job.b)
                keep_from = q[0][1].a if q else end
                held[s] = [h for h in held[s] if h[0] + len(h[2]) > keep_from]
                if job.path is None:
                    parts[k] = (np.array(xs), np.array(ys))
                    continue
                written[k] = enc.write(storage, job.path, job.row_id_offset + job.a, xs, ys, teachers, t0)
                del xs, ys
                t0 = time.perf_counter()
    assert not any(pending.values()), "a unit's job lies outside the pieces it read"
    # in job order, as the caller lists them: a val file can finish before a train file that started earlier
    return [written[k] for k in sorted(written)], [parts[k] for k in sorted(parts)]


def compute_shards(enc: Encoding, storage: Storage, files: list[tuple[str, int, int]] | list[Job],
                   teachers: list[torch.nn.Module], x: np.ndarray | dict[str, SplitRows], y: np.ndarray | None,
                   row_offset: int, threads: int = 1) -> list[Any]:
    """Run the teacher(s) over each file's rows [start, stop) of a split's arrays and write the file before
    the next one's forward; returns their manifest entries. With `x` a source's `SplitRows` by split, `files`
    is a unit's jobs (`compute_unit`): the entries, followed by the parts when there are any.

    `threads`: 1 in a Ray task (tasks run side by side); a warm actor computing shards one after another
    gets its torch threads."""
    torch.set_num_threads(threads)
    if isinstance(x, dict):
        entries, parts = compute_unit(enc, storage, files, teachers, x)
        return [entries, *parts] if parts else entries
    out = []
    t0 = time.perf_counter()
    for (path, start, stop), (xs, ys) in zip(files, _rows_by_file(x, y, files), strict=True):
        out.append(enc.write(storage, path, row_offset + start, xs, ys, teachers, t0))
        t0 = time.perf_counter()
    return out


def join_shard(enc: Encoding, storage: Storage, path: str, row_id_start: int, teachers: list[torch.nn.Module],
               *parts: tuple[np.ndarray, np.ndarray], threads: int = 1) -> list[dict[str, Any]]:
    """A file that crosses units' edges, from their parts in order: one forward over its whole rows, as the
    arrays path does it, so its bytes are the same."""
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return compute_shards(enc, storage, [(path, 0, len(y))], teachers, x, y, row_id_start, threads=threads)


# ---------------------------------------------------------------- units of a source


def unit_count(splits: dict[str, tuple[Any, Any]], shards: int, workers: int | None) -> int:
    """How many units compute a source: one per piece group, `shards` at most, but never fewer than the
    cluster's CPUs (`workers` at most) while `shards` allows: below that, a few pieces would leave CPUs idle,
    and reading a piece once more costs less than its forward, encode and write (RESULTS-scale.md)."""
    import ray

    x = splits["train"][0]
    if not isinstance(x, SplitRows):
        return 1
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    if workers is not None:
        cpus = min(cpus, workers)
    return max(1, min(shards, max(len(x.pieces), cpus)))


def units(splits: dict[str, SplitRows], count: int) -> list[dict[str, tuple[int, int]]]:
    """The source cut into `count` units, each a range of every split's rows: with at least `count` pieces,
    contiguous groups of whole pieces of about equal rows (each piece read by one unit); with fewer, each
    piece's rows of every split cut into equal parts, a piece's units each reading it whole."""
    first = next(iter(splits.values()))
    n_pieces = len(first.pieces)
    cum = {s: np.concatenate([[0], np.cumsum(r.counts, dtype=np.int64)]) for s, r in splits.items()}
    if n_pieces == 0:
        return []
    count = max(1, count)
    if count <= n_pieces:
        rows = np.cumsum([p.rows for p in first.pieces])
        bounds = [0]
        for k in range(1, count):
            cut = int(np.searchsorted(rows, rows[-1] * k / count)) + 1
            bounds.append(min(max(cut, bounds[-1] + 1), n_pieces - (count - k)))
        bounds.append(n_pieces)
        return [{s: (int(c[a]), int(c[b])) for s, c in cum.items()} for a, b in itertools.pairwise(bounds)]
    out = []
    for i in range(n_pieces):
        k = count // n_pieces + (1 if i < count % n_pieces else 0)
        for j in range(k):
            out.append({s: (int(c[i] + (c[i + 1] - c[i]) * j // k), int(c[i] + (c[i + 1] - c[i]) * (j + 1) // k))
                        for s, c in cum.items()})
    return out


# ---------------------------------------------------------------- one precompute


@dataclass
class Work:
    """A Ray task's (or warm call's) worth: `shards` (a range of a split's arrays), `unit` (a range of the
    source's pieces, `compute_unit`) or `join` (a file from the parts of the units it crosses). `writes`: the
    files whose entries it returns, in order; `parts`: the crossing files it returns a part of, in order."""

    kind: str
    writes: list[tuple[str, int]]
    args: tuple[Any, ...]
    parts: list[tuple[str, int]] = field(default_factory=list)
    unit: int = -1
    part_refs: list[Any] = field(default_factory=list)


@dataclass
class Layout:
    """Every file of every split (its manifest entry, filled in as it is written or found whole), the files
    still to compute (per split, grouped by the task range they belong to) and each split's first row id."""

    plan: dict[str, list[dict[str, Any]]]
    missing: dict[str, list[list[int]]]
    offsets: dict[str, int]


def precompute(store: SoftTargetStore, key: str, teachers: list[torch.nn.Module],
               splits: dict[str, tuple[Any, Any]], *, encoding: Encoding, shards: int, width: int,
               meta: dict[str, Any], max_retries: int = 3, workers: int | None = None, on_shard: OnShard | None = None,
               runner: ShardRunner | None = None) -> tuple[dict[str, Any], PrecomputeStats]:
    """Compute the entry `key`'s missing shards with Ray tasks (at most `workers` at a time), or one after
    another through `runner` (a warm actor: no per-task start-up), and write the manifest last.

    `width`: the classes a target spans (the kind's `target_width`), for the files' size bound; `meta`: what
    the manifest carries besides the layout (the data fingerprint, the kind's dims). Either way a failed shard
    is retried `max_retries` times and the others are still written. A complete entry is checked against this
    request and every shard's checksum, then reused with no teacher forward. Returns the saved manifest and
    what this call did."""
    existing = existing_entry(store, key, encoding, meta, len(teachers))
    if existing is not None:
        return existing, PrecomputeStats(reused=True, computed_shards=0, forward_rows=0)
    first = next((v for v in splits.values() if len(v[1])), splits["train"])
    max_rows = min(SHARD_ROWS, max(1, SHARD_BYTES // row_bytes(*first, width, encoding.format, encoding.dtype,
                                                                encoding.top_k)))
    layout = lay_out(store, key, splits, shards, encoding, max_rows, on_shard)
    todo = work_for(store, key, layout, splits,
                    unit_count=1 if runner is not None else unit_count(splits, shards, workers))
    run = Dispatch(store, key, layout.plan, encoding, teachers, on_shard)
    if runner is not None:
        run.on_warm(todo, runner, max_retries)
    else:
        run.on_ray(todo, max_retries, workers)
    run.raise_failures(max_retries)
    manifest = {
        "version": MANIFEST_VERSION, "key": key, "format": encoding.format, "dtype": encoding.dtype,
        **encoding.kept(), "ensemble": encoding.ensemble,
        "shards": shards, "splits": {s: {"rows": len(splits[s][1]), "shards": layout.plan[s]} for s in SPLITS},
        "rows": sum(len(splits[s][1]) for s in SPLITS),
        "bytes": int(sum(e["bytes"] for s in SPLITS for e in layout.plan[s])),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
    }
    store.storage.write_bytes(f"{store.dir(key)}/manifest.json", json.dumps(manifest, indent=1).encode())
    store.storage.remove_stale_temps(store.dir(key))  # left by writers killed mid-shard
    return manifest, PrecomputeStats(reused=False, computed_shards=run.computed, forward_rows=run.forward_rows)


def existing_entry(store: SoftTargetStore, key: str, encoding: Encoding, meta: dict[str, Any], teachers: int
                   ) -> dict[str, Any] | None:
    """The complete entry of this key, checked against the request (the encoding, and every scalar `meta` says
    of the data that the entry records too: its fingerprint, kind, shapes; the teachers compared as a set) and
    every shard's checksum; or None."""
    existing = store.manifest(key)
    if existing is None:
        return None
    request = {"format": encoding.format, "dtype": encoding.dtype,
               **encoding.kept(),
               **{k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k in existing}}
    if teachers > 1:
        request["ensemble"] = encoding.ensemble
    store.require(key, request)
    if "teachers" in meta and sorted(t["digest"] for t in existing.get("teachers", [])) != sorted(
            t["digest"] for t in meta["teachers"]):
        raise UserError("manifest lists other teachers than this run's; refusing to mix",
                        where=store.storage._display(f"{store.dir(key)}/manifest.json"))
    store.verify(existing)
    return existing


def _reusable_shard(store: SoftTargetStore, path: str, entry: dict[str, Any], encoding: Encoding) -> bytes | None:
    """The bytes of a shard a killed run left behind, if they hold exactly this entry's rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = store.storage.read_bytes(path)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError):
        return None
    if shard_schema_problem(table.schema, encoding.format, encoding.dtype):
        return None
    start = entry["row_id_offset"] + entry["row_start"]
    row_ids = table.column("row_id").to_numpy()
    if not np.array_equal(row_ids, np.arange(start, start + entry["rows"])):
        return None
    return data


def lay_out(store: SoftTargetStore, key: str, splits: dict[str, tuple[Any, Any]], shards: int, encoding: Encoding,
            max_rows: int, on_shard: OnShard | None) -> Layout:
    """Every shard's manifest entry, and which are still to compute (a killed run's whole ones are kept).
    Train is `shards` task ranges, val and test one per SHARD_ROWS rows, each range cut into files of at most
    `max_rows` rows: this layout depends on the split sizes alone."""
    layout = Layout({}, {}, {})
    offset = 0
    for split in SPLITS:
        n = len(splits[split][1])
        n_tasks = shards if split == "train" else max(1, int(np.ceil(n / SHARD_ROWS)))
        tasks = [file_cuts(a, b, max_rows) for a, b in shard_ranges(n, n_tasks)] if n else []
        count = sum(len(t) for t in tasks)
        plan, missing = layout.plan.setdefault(split, []), layout.missing.setdefault(split, [])
        layout.offsets[split] = offset
        for cuts in tasks:
            missing.append([])
            for a, b in cuts:
                i = len(plan)
                entry = {"path": shard_name(split, i, count), "row_start": a, "row_stop": b, "rows": b - a,
                         "row_id_offset": offset}
                plan.append(entry)
                path = store.shard_path(key, entry["path"])
                if store.storage.exists(path):  # left by an interrupted run
                    data = _reusable_shard(store, path, entry, encoding)
                    if data is not None:
                        entry.update(bytes=len(data), sha256=sha256_bytes(data))
                        if on_shard:
                            on_shard(split, i, count, True)
                        continue
                    log.warning("recomputing %s: it does not hold this entry's rows", store.storage._display(path))
                missing[-1].append(i)
        offset += n
    return layout


def work_for(store: SoftTargetStore, key: str, layout: Layout, splits: dict[str, tuple[Any, Any]],
             unit_count: int) -> list[Work]:
    """Who computes the missing files: from arrays, one task per range of a split; from a source (`SplitRows`
    for every split), `unit_count` units, each reading its pieces once for all three splits (`units`)."""
    import ray

    plan, missing = layout.plan, layout.missing

    def path(split: str, i: int) -> str:
        return store.shard_path(key, plan[split][i]["path"])

    todo: list[Work] = []
    if all(isinstance(splits[s][0], SplitRows) for s in SPLITS):
        rows = {s: splits[s][0] for s in SPLITS}
        for u, ranges in enumerate(units(rows, unit_count)):
            jobs, writes, parts = [], [], []
            for split in SPLITS:
                lo, hi = ranges[split]
                for i in itertools.chain.from_iterable(missing[split]):
                    a, b = plan[split][i]["row_start"], plan[split][i]["row_stop"]
                    if lo >= hi or b <= lo or a >= hi:
                        continue
                    whole = lo <= a and b <= hi
                    jobs.append(Job(split, max(a, lo), min(b, hi), path(split, i) if whole else None,
                                    layout.offsets[split]))
                    (writes if whole else parts).append((split, i))
            if jobs:
                todo.append(Work("unit", writes, (store.storage, jobs, rows, None, 0), parts=parts, unit=u))
        return todo
    for split in SPLITS:
        x, y = splits[split]
        refs = (ray.put(x), ray.put(y)) if any(missing[split]) else None
        for idx in missing[split]:
            if idx:
                files = [(path(split, i), plan[split][i]["row_start"], plan[split][i]["row_stop"]) for i in idx]
                todo.append(Work("shards", [(split, i) for i in idx],
                                 (store.storage, files, refs[0], refs[1], layout.offsets[split])))
    return todo


class Dispatch:
    """One precompute's work as it runs: each item's call arguments, the finished shards' sizes and checksums
    filled into `plan`, and the failures collected (`raise_failures` raises them at the end)."""

    def __init__(self, store: SoftTargetStore, key: str, plan: dict[str, list[dict[str, Any]]], encoding: Encoding,
                 teachers: list[torch.nn.Module], on_shard: OnShard | None) -> None:
        import ray

        self.store, self.key, self.plan, self.on_shard = store, key, plan, on_shard
        self.encoding, self.teachers_ref = encoding, ray.put(teachers)
        self.computed, self.forward_rows = 0, 0
        self.failures: list[str] = []
        self.failed_files: set[tuple[str, int]] = set()
        self.mistakes: list[UserError] = []  # the user's (a source changed under the run): exit 2, not a failed stage

    def args(self, item: Work) -> tuple[Any, ...]:
        if item.kind == "join":
            storage, (split, i), refs = item.args
            entry = self.plan[split][i]
            return (self.encoding, storage, self.store.shard_path(self.key, entry["path"]),
                    entry["row_id_offset"] + entry["row_start"], self.teachers_ref, *refs)
        storage, files, x_ref, y_ref, off = item.args
        return (self.encoding, storage, files, self.teachers_ref, x_ref, y_ref, off)

    def failed(self, files: list[tuple[str, int]], exc: BaseException) -> None:
        """Work failed: each of its shards not written is a failure (those it wrote are left for a rerun)."""
        mistake = user_error_in(exc)  # inside a Ray task's or actor call's error
        if mistake is not None:
            self.mistakes.append(mistake)
            self.failed_files.update(files)
            return
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        for split, i in files:
            if (split, i) in self.failed_files:
                continue
            self.failed_files.add((split, i))
            entry = self.plan[split][i]
            self.failures.append(f"{self.store.storage._display(self.store.shard_path(self.key, entry['path']))} "
                                 f"(rows {entry['row_start']}..{entry['row_stop'] - 1} of {split}): "
                                 f"{type(exc).__name__}: {reason}")

    def done(self, files: list[tuple[str, int]], outs: list[dict[str, Any]]) -> None:
        for (split, i), out in zip(files, outs, strict=True):
            self.plan[split][i].update(bytes=out["bytes"], sha256=out["sha256"])
            self.computed += 1
            self.forward_rows += out["forward_rows"]
            if self.on_shard:
                self.on_shard(split, i, len(self.plan[split]), False)

    def raise_failures(self, max_retries: int) -> None:
        """The user's mistake (exit 2) or the shards that kept failing (exit 1); the others are written."""
        if self.mistakes:
            raise self.mistakes[0]
        if self.failures:
            total = sum(len(v) for v in self.plan.values())
            raise ShardFailed(f"{len(self.failures)} of {total} soft-target shards failed after {max_retries} "
                              f"retries; the {total - len(self.failures)} others are written and stay under "
                              f"{self.store.uri(self.key)}, and a rerun computes only the missing ones:\n  "
                              + "\n  ".join(self.failures))

    def on_warm(self, todo: list[Work], runner: ShardRunner, max_retries: int) -> None:
        """One after another on a warm process: each item tried 1 + max_retries times."""
        for item in todo:
            assert not item.parts, "a warm runner computes the source as one unit: no file crosses its edge"
            out, error = None, None
            for _ in range(max_retries + 1):
                try:
                    out = runner(*self.args(item))
                    break
                except Exception as exc:  # noqa: BLE001 - the teacher's error or a dead worker: retried
                    error = exc
                    if user_error_in(exc) is not None:  # the same again on a retry
                        break
            if out is None:
                self.failed(item.writes, error)
                continue
            self.done(item.writes, out)

    def on_ray(self, todo: list[Work], max_retries: int, workers: int | None) -> None:
        """Ray tasks, `workers` at a time (retried by Ray). A file that crosses units' edges is joined from
        their parts by one more task, queued first, once they have all finished."""
        import ray

        options = {"num_cpus": 1, "max_retries": max_retries, "retry_exceptions": True}
        remote, join = ray.remote(**options)(compute_shards), ray.remote(**options)(join_shard)
        # a crossing file: the units that hold a part of it, and the parts finished so far by unit
        sources: dict[tuple[str, int], list[int]] = {}
        for item in todo:
            for f in item.parts:
                sources.setdefault(f, []).append(item.unit)
        have: dict[tuple[str, int], dict[int, Any]] = {}
        pending: dict[Any, Work] = {}
        while todo or pending:
            while todo and (workers is None or len(pending) < workers):
                item = todo.pop(0)
                if item.kind == "join":
                    pending[join.remote(*self.args(item))] = item
                elif item.parts:
                    refs = remote.options(num_returns=1 + len(item.parts)).remote(*self.args(item))
                    item.part_refs = refs[1:]
                    pending[refs[0]] = item
                else:
                    pending[remote.remote(*self.args(item))] = item
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # keep collecting: finished shards must be written
                self.failed(item.writes + item.parts, exc)
                continue
            self.done(item.writes, out)
            for f, ref in zip(item.parts, item.part_refs, strict=True):
                have.setdefault(f, {})[item.unit] = ref
                if len(have[f]) == len(sources[f]) and f not in self.failed_files:  # its last part: join it first
                    todo.insert(0, Work("join", [f], (self.store.storage, f, [have[f][u] for u in sources[f]])))
                    del have[f]
            item.part_refs = []
