"""The soft-target store: teacher outputs computed once by Ray tasks, kept as Parquet shards + a manifest.

Layout under the storage root:

    soft_targets/<key>/manifest.json                 written last; its presence means "complete"
    soft_targets/<key>/<split>/part-00003-of-00008.parquet

The key hashes everything the targets depend on (teacher weights, data fingerprint and split,
preprocessing, format, dtype, top_k, ensemble rule), so a rerun with the same inputs finds the shards
and runs no teacher forward, and any change lands under a new key. Shards are written whole (see
`Storage.write_bytes`), so after an interruption only the missing shards are computed. Every row carries
its `row_id` (0..N-1 over train, val, test in that order), which readers check against the manifest.
Temperature is never baked in: the shards hold logits at T=1 (or top-k logits + tail log-mass).

A manifest is trusted only when it is whole: right version and key, and per split shards that tile
[0, rows) with a size and checksum each. Anything else is an error naming the object; nothing is
deleted on the way (`kdflow cache rm KEY` is the one way to drop an entry).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.errors import ShardFailed, UserError, user_error_in
from tasks.kinds import TaskKind
from tasks.kinds.classification import Classification, teacher_logits
from tasks.layout import SOFT_TARGETS
from tasks.pieces import SplitRows, piece_rows
from tasks.shards import TargetBatch, decode_rows, encode_rows, shard_schema_problem
from tasks.storage import Storage, sha256_bytes
from tasks.target_formats import FORMATS, TORCH_DTYPES

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
# a stored entry must agree with the run on these, or the run refuses to use it
MATCHED_KEYS = ("format", "dtype", "top_k", "data_fingerprint", "num_classes", "num_features")

log = logging.getLogger(__name__)
CLASSIFICATION = Classification()

__all__ = ["SPLITS", "PrecomputeStats", "SoftTargetStore", "TargetBatch", "cache_key", "shard_ranges", "teacher_logits"]


def cache_key(teacher_digests: list[str], data_fingerprint: str, format: str, dtype: str, top_k: int | None,
              ensemble: str) -> str:
    """The entry's name: a hash of everything the stored rows depend on (teacher order does not matter)."""
    payload = json.dumps({"v": MANIFEST_VERSION, "teachers": sorted(teacher_digests), "data": data_fingerprint,
                          "format": format, "dtype": dtype, "top_k": top_k if format == "topk" else None,
                          "ensemble": ensemble if len(teacher_digests) > 1 else None}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# Every shard file holds at most SHARD_ROWS rows and about SHARD_BYTES stored bytes, whatever the split's size
# or `soft_targets.shards` (which sets how many tasks compute train, each writing its range as files of this
# bound): a shard is the unit a worker reads, verifies and decodes at once (tasks/stream.py), a streamed
# evaluation holds (orchestrator/evaluation.py) and a task holds between its forward and its write, so all
# three stay the same at any size. val and test get one task per SHARD_ROWS rows.
SHARD_ROWS = 50_000
SHARD_BYTES = 16 * 2**20


def row_bytes(x: Any, y: Any, num_classes: int, format: str, dtype: str, top_k: int | None) -> int:
    """About what one row takes stored (before compression): its inputs, label(s) and teacher targets. A
    sequence row (an LM's: labels [n, S]) has per-token targets."""
    width = x.num_features if isinstance(x, SplitRows) else int(np.prod(x.shape[1:], dtype=np.int64))
    tokens = int(y.shape[1]) if getattr(y, "ndim", 1) == 2 else 1
    per_value = TORCH_DTYPES[dtype].itemsize
    targets = num_classes * per_value if format == "logits" else int(top_k or 1) * (per_value + 4) + 4
    return 8 + width * 4 + tokens * (8 + targets)


def file_cuts(a: int, b: int, max_rows: int) -> list[tuple[int, int]]:
    """[a, b) cut into as few equal files as keep each at most `max_rows` rows."""
    return [(a + lo, a + hi) for lo, hi in shard_ranges(b - a, -(-(b - a) // max(1, max_rows)))]


def shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    shards = max(1, min(shards, rows))
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


# ---------------------------------------------------------------- teacher forward (a Ray task or a warm call per shard)

# A shard runner: called with `compute_shards`' positional arguments (teachers, x and y as Ray object refs),
# it computes and writes the shards somewhere (the run's warm actor) and returns their entries, or raises.
ShardRunner = Callable[..., list[dict[str, Any]]]


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


def _write_file(task: TaskKind, storage: Storage, path: str, row_id_start: int, xs: np.ndarray, ys: np.ndarray,
                teachers: list[torch.nn.Module], format: str, dtype: str, top_k: int | None, ensemble: str,
                t0: float) -> dict[str, Any]:
    logits = task.teacher_outputs(teachers, xs, ensemble)
    n = len(ys)
    data = encode_rows(np.arange(row_id_start, row_id_start + n), xs, ys, logits, format, dtype, top_k)
    del logits
    storage.write_bytes(path, data)
    return {"rows": n, "bytes": len(data), "sha256": sha256_bytes(data), "forward_rows": n,
            "seconds": time.perf_counter() - t0}


def _take(held: list[tuple[int, np.ndarray, np.ndarray]], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [(x[max(a, lo) - lo:min(b, lo + len(y)) - lo], y[max(a, lo) - lo:min(b, lo + len(y)) - lo])
             for lo, x, y in held if lo < b and lo + len(y) > a]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def compute_unit(task: TaskKind, storage: Storage, jobs: list[Job], teachers: list[torch.nn.Module],
                 splits: dict[str, SplitRows], format: str, dtype: str, top_k: int | None, ensemble: str,
                 ) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray]]]:
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
        want = {}
        for s, q in pending.items():
            first = splits[s].first(i)
            lo, hi = max(first, q[0][1].a) if q else 0, min(first + splits[s].counts[i], q[-1][1].b) if q else 0
            if lo < hi:
                want[s] = (lo, hi)
        for s, (lo, xs, ys) in piece_rows(splits, i, want).items():
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
                written[k] = _write_file(task, storage, job.path, job.row_id_offset + job.a, xs, ys, teachers, format,
                                         dtype, top_k, ensemble, t0)
                del xs, ys
                t0 = time.perf_counter()
    assert not any(pending.values()), "a unit's job lies outside the pieces it read"
    # in job order, as the caller lists them: a val file can finish before a train file that started earlier
    return [written[k] for k in sorted(written)], [parts[k] for k in sorted(parts)]


def compute_shards(task: TaskKind, storage: Storage, files: list[tuple[str, int, int]] | list[Job],
                   teachers: list[torch.nn.Module], x: np.ndarray | dict[str, SplitRows], y: np.ndarray | None,
                   row_offset: int, format: str, dtype: str, top_k: int | None, ensemble: str,
                   threads: int = 1) -> list[Any]:
    """Run the teacher(s) over each file's rows [start, stop) of a split's arrays and write the file before
    the next one's forward; returns their manifest entries. With `x` a source's `SplitRows` by split, `files`
    is a unit's jobs (`compute_unit`): the entries, followed by the parts when there are any.

    `threads`: 1 in a Ray task (tasks run side by side); a warm actor computing shards one after another
    gets its torch threads."""
    torch.set_num_threads(threads)
    if isinstance(x, dict):
        entries, parts = compute_unit(task, storage, files, teachers, x, format, dtype, top_k, ensemble)
        return [entries, *parts] if parts else entries
    out = []
    t0 = time.perf_counter()
    for (path, start, stop), (xs, ys) in zip(files, _rows_by_file(x, y, files), strict=True):
        out.append(_write_file(task, storage, path, row_offset + start, xs, ys, teachers, format, dtype, top_k,
                               ensemble, t0))
        t0 = time.perf_counter()
    return out


def join_shard(task: TaskKind, storage: Storage, path: str, row_id_start: int, teachers: list[torch.nn.Module],
               format: str, dtype: str, top_k: int | None, ensemble: str, *parts: tuple[np.ndarray, np.ndarray],
               threads: int = 1) -> list[dict[str, Any]]:
    """A file that crosses units' edges, from their parts in order: one forward over its whole rows, as the
    arrays path does it, so its bytes are the same."""
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return compute_shards(task, storage, [(path, 0, len(y))], teachers, x, y, row_id_start, format, dtype, top_k,
                          ensemble, threads=threads)


def _unit_count(splits: dict[str, tuple[Any, Any]], shards: int, workers: int | None) -> int:
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


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class PrecomputeStats:
    """What one `precompute` call did; not saved (the manifest is what is saved, and says what is stored)."""

    reused: bool  # a complete entry was there: no teacher forward at all
    computed_shards: int
    forward_rows: int  # rows the teacher(s) ran on in this call


class SoftTargetStore:
    """Reads, lists, verifies and removes stored soft targets; `precompute` fills it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def dir(self, key: str) -> str:
        return self.storage.path(SOFT_TARGETS, key)

    def uri(self, key: str) -> str:
        return self.storage.uri(SOFT_TARGETS, key)

    def _shard_path(self, key: str, rel: str) -> str:
        return f"{self.dir(key)}/{rel}"

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a complete entry, None when there is none; an error when it is not whole."""
        path = f"{self.dir(key)}/manifest.json"
        if not self.storage.exists(path):
            return None
        where = self.storage._display(path)
        try:
            m = json.loads(self.storage.read_bytes(path))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError("manifest is not valid JSON (remove the entry with `kdflow cache rm "
                            f"{key}` to recompute)", where=where) from None
        problem = manifest_problem(m, key)
        if problem:
            raise UserError(f"manifest is not a complete kdflow soft-target manifest: {problem}", where=where)
        return m

    def require(self, key: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest, which must exist and agree with `expect`; readers start here."""
        m = self.manifest(key)
        if m is None:
            raise UserError("no complete manifest: these soft targets were never finished (rerun the workflow)",
                            where=self.uri(key))
        for k, v in (expect or {}).items():
            if m.get(k) != v:
                raise UserError(f"manifest says {k}={m.get(k)!r} but the run expects {v!r}; refusing to mix",
                                where=self.storage._display(f"{self.dir(key)}/manifest.json"))
        return m

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for path in self.storage.ls(self.storage.path(SOFT_TARGETS)):
            key = path.rstrip("/").split("/")[-1]
            try:
                m = self.manifest(key)
                error = None
            except UserError as exc:
                m, error = None, str(exc)
            out.append({"key": key, "uri": self.uri(key), "complete": m is not None,
                        **({"error": error} if error else {}),
                        **({k: m.get(k) for k in ("format", "dtype", "top_k", "rows", "bytes", "created_at",
                                                  "num_classes", "teachers")} if m else {})})
        return out

    def remove(self, key: str) -> bool:
        if not self.storage.exists(self.dir(key)):
            return False
        self.storage.rm(self.dir(key))
        return True

    def verify(self, manifest: dict[str, Any], threads: int = 8) -> None:
        """Read every shard and check its size and checksum; the first bad one is an error naming it."""
        shards = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]

        def check(shard: dict[str, Any]) -> None:
            self._checked_bytes(manifest["key"], shard)

        with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
            list(pool.map(check, shards))

    def _checked_bytes(self, key: str, shard: dict[str, Any]) -> bytes:
        path = self._shard_path(key, shard["path"])
        data = self.storage.read_bytes(path)
        if len(data) != shard["bytes"]:
            problem = f"size mismatch ({len(data)} bytes, the manifest says {shard['bytes']})"
        elif sha256_bytes(data) != shard["sha256"]:
            problem = "checksum mismatch (its sha256 is not the manifest's)"
        else:
            return data
        raise UserError(f"{problem}: the shard is corrupted; nothing was deleted (`kdflow cache rm {key}` drops "
                        "the entry so the next run recomputes it)", where=self.storage._display(path))

    def read(self, manifest: dict[str, Any], split: str, start: int = 0, stop: int | None = None,
             verify: bool = True) -> TargetBatch:
        """Rows [start, stop) of a split, reading only the shards that overlap them."""
        info = manifest["splits"][split]
        stop = info["rows"] if stop is None else stop
        parts = []
        for shard in info["shards"]:
            a, b = shard["row_start"], shard["row_stop"]
            if b <= start or a >= stop:
                continue
            path = self._shard_path(manifest["key"], shard["path"])
            data = self._checked_bytes(manifest["key"], shard) if verify else self.storage.read_bytes(path)
            batch = decode_rows(data, manifest["dtype"])
            expected = torch.arange(shard["row_id_offset"] + a, shard["row_id_offset"] + b)
            if not torch.equal(batch.row_id, expected):
                raise UserError(f"shard holds rows other than {a}..{b - 1} of split {split}",
                                where=self.storage._display(path))
            parts.append(batch.take(slice(max(start, a) - a, min(stop, b) - a)))
        if not parts:
            raise UserError(f"no rows in [{start}, {stop}) of split {split}", where=self.uri(manifest["key"]))
        return TargetBatch.concat(parts)

    def batches(self, manifest: dict[str, Any], split: str, verify: bool = True) -> Iterator[TargetBatch]:
        """A split's rows one shard at a time, in row order (checked as `read` checks them): a reader that
        reduces over the split (the test metrics) holds one shard, not the split."""
        for shard in manifest["splits"][split]["shards"]:
            if shard["row_stop"] > shard["row_start"]:
                yield self.read(manifest, split, shard["row_start"], shard["row_stop"], verify=verify)

    def _reusable_shard(self, path: str, entry: dict[str, Any], format: str, dtype: str) -> bytes | None:
        """The bytes of a shard a killed run left behind, if they hold exactly this entry's rows."""
        data = self.storage.read_bytes(path)
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError):
            return None
        if shard_schema_problem(table.schema, format, dtype):
            return None
        start = entry["row_id_offset"] + entry["row_start"]
        row_ids = table.column("row_id").to_numpy()
        if not np.array_equal(row_ids, np.arange(start, start + entry["rows"])):
            return None
        return data

    def precompute(self, key: str, teachers: list[torch.nn.Module], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                   *, shards: int, format: str, dtype: str, top_k: int | None, ensemble: str,
                   meta: dict[str, Any], max_retries: int = 3, workers: int | None = None,
                   on_shard: Callable[[str, int, int, bool], None] | None = None,
                   task: TaskKind = CLASSIFICATION,
                   runner: ShardRunner | None = None) -> tuple[dict[str, Any], PrecomputeStats]:
        """Compute the missing shards with Ray tasks (at most `workers` at a time), or one after another
        through `runner` (a warm actor: no per-task start-up), and write the manifest last.

        Either way a failed shard is retried `max_retries` times and the others are still written. A
        complete entry is checked against this request and every shard's checksum, then reused with no
        teacher forward. Returns the saved manifest and what this call did.
        """
        existing = self._existing(key, teachers, format, dtype, top_k, ensemble, meta)
        if existing is not None:
            return existing, PrecomputeStats(reused=True, computed_shards=0, forward_rows=0)
        first = next((v for v in splits.values() if len(v[1])), splits["train"])
        max_rows = min(SHARD_ROWS, max(1, SHARD_BYTES // row_bytes(*first, int(meta.get("num_classes", 1)), format,
                                                                    dtype, top_k)))
        plan, todo = self._plan(key, splits, shards, format, dtype, max_rows, on_shard,
                                unit_count=1 if runner is not None else _unit_count(splits, shards, workers))
        computed, forward_rows = self._dispatch(key, plan, todo, task, teachers, format=format, dtype=dtype,
                                                top_k=top_k, ensemble=ensemble, max_retries=max_retries,
                                                workers=workers, on_shard=on_shard, runner=runner)
        manifest = {
            "version": MANIFEST_VERSION, "key": key, "format": format, "dtype": dtype,
            "top_k": top_k if format == "topk" else None, "ensemble": ensemble, "shards": shards,
            "splits": {s: {"rows": len(splits[s][1]), "shards": plan[s]} for s in SPLITS},
            "rows": sum(len(splits[s][1]) for s in SPLITS),
            "bytes": int(sum(e["bytes"] for s in SPLITS for e in plan[s])),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **meta,
        }
        self.storage.write_bytes(f"{self.dir(key)}/manifest.json", json.dumps(manifest, indent=1).encode())
        self.storage.remove_stale_temps(self.dir(key))  # left by writers killed mid-shard
        return manifest, PrecomputeStats(reused=False, computed_shards=computed, forward_rows=forward_rows)

    def _existing(self, key: str, teachers: list[torch.nn.Module], format: str, dtype: str, top_k: int | None,
                  ensemble: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The complete entry of this key, checked against the request and every shard's checksum; or None."""
        request = {"format": format, "dtype": dtype, "top_k": top_k if format == "topk" else None,
                   **{k: meta[k] for k in MATCHED_KEYS if k in meta}}
        if len(teachers) > 1:
            request["ensemble"] = ensemble
        existing = self.manifest(key)
        if existing is None:
            return None
        self.require(key, request)
        if "teachers" in meta and sorted(t["digest"] for t in existing.get("teachers", [])) != sorted(
                t["digest"] for t in meta["teachers"]):
            raise UserError("manifest lists other teachers than this run's; refusing to mix",
                            where=self.storage._display(f"{self.dir(key)}/manifest.json"))
        self.verify(existing)
        return existing

    def _plan(self, key: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], shards: int, format: str,
              dtype: str, max_rows: int, on_shard: Callable[[str, int, int, bool], None] | None,
              unit_count: int = 1) -> tuple[dict[str, list[dict[str, Any]]], list[Work]]:
        """Every shard's manifest entry, and the work still to do for the shards still to compute (a killed
        run's whole ones are kept). The files: train is `shards` task ranges, val and test one per SHARD_ROWS
        rows, each range cut into files of at most `max_rows` rows; this layout depends on the split sizes
        alone. Who computes them: from arrays, one task per range of a split; from a source (`SplitRows` for
        every split), `unit_count` units, each reading its pieces once for all three splits (`units`)."""
        import ray

        plan: dict[str, list[dict[str, Any]]] = {}
        missing: dict[str, list[list[int]]] = {}
        offsets: dict[str, int] = {}
        offset = 0
        for split in SPLITS:
            _, y = splits[split]
            n_tasks = shards if split == "train" else max(1, int(np.ceil(len(y) / SHARD_ROWS)))
            tasks = [file_cuts(a, b, max_rows) for a, b in shard_ranges(len(y), n_tasks)] if len(y) else []
            count = sum(len(t) for t in tasks)
            plan[split], missing[split], offsets[split] = [], [], offset
            for cuts in tasks:
                missing[split].append([])
                for a, b in cuts:
                    i = len(plan[split])
                    rel = shard_name(split, i, count)
                    entry = {"path": rel, "row_start": a, "row_stop": b, "rows": b - a, "row_id_offset": offset}
                    plan[split].append(entry)
                    path = self._shard_path(key, rel)
                    if self.storage.exists(path):  # left by an interrupted run
                        data = self._reusable_shard(path, entry, format, dtype)
                        if data is not None:
                            entry.update(bytes=len(data), sha256=sha256_bytes(data))
                            if on_shard:
                                on_shard(split, i, count, True)
                            continue
                        log.warning("recomputing %s: it does not hold this entry's rows", self.storage._display(path))
                    missing[split][-1].append(i)
            offset += len(y)

        def path(split: str, i: int) -> str:
            return self._shard_path(key, plan[split][i]["path"])

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
                                        offsets[split]))
                        (writes if whole else parts).append((split, i))
                if jobs:
                    todo.append(Work("unit", writes, (self.storage, jobs, rows, None, 0), parts=parts, unit=u))
            return plan, todo
        for split in SPLITS:
            x, y = splits[split]
            refs = (ray.put(x), ray.put(y)) if any(missing[split]) else None
            for idx in missing[split]:
                if idx:
                    files = [(path(split, i), plan[split][i]["row_start"], plan[split][i]["row_stop"]) for i in idx]
                    todo.append(Work("shards", [(split, i) for i in idx],
                                     (self.storage, files, refs[0], refs[1], offsets[split])))
        return plan, todo

    def _dispatch(self, key: str, plan: dict[str, list[dict[str, Any]]], todo: list[Work],
                  task: TaskKind, teachers: list[torch.nn.Module], *, format: str, dtype: str, top_k: int | None,
                  ensemble: str, max_retries: int, workers: int | None,
                  on_shard: Callable[[str, int, int, bool], None] | None,
                  runner: ShardRunner | None = None) -> tuple[int, int]:
        """Run the work (Ray tasks, or `runner` calls), filling in each finished shard's size and checksum;
        returns (shards, rows) computed. Failures are collected, so that every shard that can be written is,
        then raised together."""
        import ray

        run = _Dispatch(self, key, plan, (task, ray.put(teachers), format, dtype, top_k, ensemble), on_shard)
        if runner is not None:
            run.on_warm(todo, runner, max_retries)
        else:
            run.on_ray(todo, max_retries, workers)
        if run.mistakes:  # the other shards are written and kept, as for a failure
            raise run.mistakes[0]
        if run.failures:
            total = sum(len(v) for v in plan.values())
            raise ShardFailed(f"{len(run.failures)} of {total} soft-target shards failed after {max_retries} "
                              f"retries; the {total - len(run.failures)} others are written and stay under "
                              f"{self.uri(key)}, and a rerun computes only the missing ones:\n  "
                              + "\n  ".join(run.failures))
        return run.computed, run.forward_rows


class _Dispatch:
    """One precompute's work as it runs: each item's call arguments, the finished shards' sizes and checksums
    filled into `plan`, and the failures collected (`SoftTargetStore._dispatch` raises them at the end)."""

    def __init__(self, store: SoftTargetStore, key: str, plan: dict[str, list[dict[str, Any]]],
                 common: tuple[Any, ...], on_shard: Callable[[str, int, int, bool], None] | None) -> None:
        self.store, self.key, self.plan, self.on_shard = store, key, plan, on_shard
        # (task, teachers' object ref, format, dtype, top_k, ensemble): what every call takes
        self.task, self.teachers_ref, *self.encoding = common
        self.computed, self.forward_rows = 0, 0
        self.failures: list[str] = []
        self.failed_files: set[tuple[str, int]] = set()
        self.mistakes: list[UserError] = []  # the user's (a source changed under the run): exit 2, not a failed stage

    def args(self, item: Work) -> tuple[Any, ...]:
        if item.kind == "join":
            storage, (split, i), refs = item.args
            entry = self.plan[split][i]
            return (self.task, storage, self.store._shard_path(self.key, entry["path"]),
                    entry["row_id_offset"] + entry["row_start"], self.teachers_ref, *self.encoding, *refs)
        storage, files, x_ref, y_ref, off = item.args
        return (self.task, storage, files, self.teachers_ref, x_ref, y_ref, off, *self.encoding)

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
            self.failures.append(f"{self.store.storage._display(self.store._shard_path(self.key, entry['path']))} "
                                 f"(rows {entry['row_start']}..{entry['row_stop'] - 1} of {split}): "
                                 f"{type(exc).__name__}: {reason}")

    def done(self, files: list[tuple[str, int]], outs: list[dict[str, Any]]) -> None:
        for (split, i), out in zip(files, outs, strict=True):
            self.plan[split][i].update(bytes=out["bytes"], sha256=out["sha256"])
            self.computed += 1
            self.forward_rows += out["forward_rows"]
            if self.on_shard:
                self.on_shard(split, i, len(self.plan[split]), False)

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


def manifest_problem(m: Any, key: str) -> str | None:
    """Why `m` is not a whole manifest for `key` (shards tiling every split, sizes, checksums), or None."""
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not an object"
    if m.get("version") != MANIFEST_VERSION or m.get("key") != key:
        return (f"it is for key {m.get('key')!r} version {m.get('version')!r}, expected {key!r} version "
                f"{MANIFEST_VERSION}")
    if m.get("format") not in FORMATS or m.get("dtype") not in TORCH_DTYPES:
        return f"unknown format/dtype {m.get('format')!r}/{m.get('dtype')!r}"
    splits = m.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        return f"splits {sorted(splits) if isinstance(splits, dict) else splits!r}, expected {list(SPLITS)}"
    offset = 0
    for split in SPLITS:
        info = splits[split]
        rows, row = info.get("rows"), 0
        for shard in info.get("shards", []):
            if any(k not in shard for k in ("path", "row_start", "row_stop", "rows", "row_id_offset", "bytes",
                                            "sha256")):
                return f"a shard of split {split} lacks its path, rows, size or checksum"
            if (shard["row_start"] != row or shard["rows"] != shard["row_stop"] - shard["row_start"]
                    or shard["rows"] <= 0 or shard["row_id_offset"] != offset):
                return f"the shards of split {split} do not tile its rows (at {shard['path']})"
            row = shard["row_stop"]
        if row != rows:
            return f"the shards of split {split} cover {row} of its {rows} rows"
        offset += rows
    if m.get("rows") != offset:
        return f"rows {m.get('rows')!r}, but the splits add up to {offset}"
    return None
