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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.errors import ShardFailed, UserError, user_error_in
from tasks.kinds import TaskKind
from tasks.kinds.classification import Classification, teacher_logits
from tasks.layout import SOFT_TARGETS
from tasks.pieces import SplitRows
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


def _rows_by_file(x: np.ndarray | SplitRows, y: np.ndarray | SplitRows, files: list[tuple[str, int, int]],
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each file's rows (features, labels) in order. From a source, its pieces are read once each, in order,
    and only those that hold some file's rows (a resumed task skips the pieces of the files already written):
    what is held is at most one piece's rows of the split and one file's."""
    if not isinstance(x, SplitRows):
        for _, a, b in files:
            yield x[a:b], y[a:b]
        return
    ranges = iter(x.ranges(files[0][1], files[-1][2]))  # each within one piece
    held: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    for _, a, b in files:
        held = [h for h in held if h[1] > a]
        while not held or held[-1][1] < b:
            lo, hi = next(ranges)
            if hi > a:
                held.append((lo, hi, *x.rows(lo, hi)))
        parts = [(h[2][max(a, h[0]) - h[0]:min(b, h[1]) - h[0]], h[3][max(a, h[0]) - h[0]:min(b, h[1]) - h[0]])
                 for h in held if h[0] < b]
        yield (np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0],
               np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1])


def compute_shards(task: TaskKind, storage: Storage, files: list[tuple[str, int, int]],
                   teachers: list[torch.nn.Module], x: np.ndarray | SplitRows, y: np.ndarray | SplitRows,
                   row_offset: int, format: str, dtype: str, top_k: int | None, ensemble: str,
                   threads: int = 1) -> list[dict[str, Any]]:
    """Run the teacher(s) over each file's rows [start, stop) of a split (its arrays, or `SplitRows` read
    from the source here) and write the file before the next one's forward; returns their manifest entries.

    `threads`: 1 in a Ray task (tasks run side by side); a warm actor computing shards one after another
    gets its torch threads."""
    torch.set_num_threads(threads)
    out = []
    t0 = time.perf_counter()
    for (path, start, stop), (xs, ys) in zip(files, _rows_by_file(x, y, files), strict=True):
        logits = task.teacher_outputs(teachers, xs, ensemble)
        data = encode_rows(np.arange(row_offset + start, row_offset + stop), xs, ys, logits, format, dtype, top_k)
        del logits, xs, ys
        storage.write_bytes(path, data)
        out.append({"rows": stop - start, "bytes": len(data), "sha256": sha256_bytes(data),
                    "forward_rows": stop - start, "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
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
        plan, todo = self._plan(key, splits, shards, format, dtype, max_rows, on_shard)
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
              ) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, list[int], tuple[Any, ...]]]]:
        """Every shard's manifest entry, and the tasks still to run: each a split, the indices of its shards
        still to compute (a killed run's whole ones are kept) and its arguments. Train is `shards` tasks, val
        and test one per SHARD_ROWS rows; each task's range is cut into files of at most `max_rows` rows."""
        import ray

        plan: dict[str, list[dict[str, Any]]] = {}
        todo: list[tuple[str, list[int], tuple[Any, ...]]] = []
        offset = 0
        for split in SPLITS:
            x, y = splits[split]
            n_tasks = shards if split == "train" else max(1, int(np.ceil(len(y) / SHARD_ROWS)))
            tasks = [file_cuts(a, b, max_rows) for a, b in shard_ranges(len(y), n_tasks)] if len(y) else []
            count = sum(len(t) for t in tasks)
            plan[split] = []
            # a split readable from the source by row range goes to each task as it is (small)
            refs = None if not tasks else (x, y) if isinstance(x, SplitRows) else (ray.put(x), ray.put(y))
            for cuts in tasks:
                missing: list[int] = []
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
                    missing.append(i)
                if missing:
                    files = [(self._shard_path(key, plan[split][i]["path"]), plan[split][i]["row_start"],
                              plan[split][i]["row_stop"]) for i in missing]
                    todo.append((split, missing, (self.storage, files, refs[0], refs[1], offset)))
            offset += len(y)
        return plan, todo

    def _dispatch(self, key: str, plan: dict[str, list[dict[str, Any]]], todo: list[tuple[str, int, tuple[Any, ...]]],
                  task: TaskKind, teachers: list[torch.nn.Module], *, format: str, dtype: str, top_k: int | None,
                  ensemble: str, max_retries: int, workers: int | None,
                  on_shard: Callable[[str, int, int, bool], None] | None,
                  runner: ShardRunner | None = None) -> tuple[int, int]:
        """Run the shard tasks (or `runner` calls), filling in each finished shard's size and checksum; returns
        (shards, rows) computed. Failures are collected, so that every shard that can be written is, then
        raised together."""
        import ray

        total = sum(len(v) for v in plan.values())
        teachers_ref = ray.put(teachers)
        computed, forward_rows, failures = 0, 0, []

        def args(item: tuple[str, list[int], tuple[Any, ...]]) -> tuple[Any, ...]:
            storage, files, x_ref, y_ref, off = item[2]
            return (task, storage, files, teachers_ref, x_ref, y_ref, off, format, dtype, top_k, ensemble)

        mistakes: list[UserError] = []  # the user's (a source changed under the run): exit 2, not a failed stage

        def failed(split: str, idx: list[int], exc: BaseException) -> None:
            """A task failed: each of its shards not written is a failure (those it wrote are left for a rerun)."""
            mistake = user_error_in(exc)  # inside a Ray task's or actor call's error
            if mistake is not None:
                mistakes.append(mistake)
                return
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            for i in idx:
                entry = plan[split][i]
                failures.append(f"{self.storage._display(self._shard_path(key, entry['path']))} (rows "
                                f"{entry['row_start']}..{entry['row_stop'] - 1} of {split}): "
                                f"{type(exc).__name__}: {reason}")

        def done(split: str, idx: list[int], outs: list[dict[str, Any]]) -> None:
            nonlocal computed, forward_rows
            for i, out in zip(idx, outs, strict=True):
                plan[split][i].update(bytes=out["bytes"], sha256=out["sha256"])
                computed += 1
                forward_rows += out["forward_rows"]
                if on_shard:
                    on_shard(split, i, len(plan[split]), False)

        if runner is not None:  # one after another on a warm process: each shard tried 1 + max_retries times
            for item in todo:
                out, error = None, None
                for _ in range(max_retries + 1):
                    try:
                        out = runner(*args(item))
                        break
                    except Exception as exc:  # noqa: BLE001 - the teacher's error or a dead worker: retried
                        error = exc
                        if user_error_in(exc) is not None:  # the same again on a retry
                            break
                if out is None:
                    failed(item[0], item[1], error)
                    continue
                done(item[0], item[1], out)
        else:
            remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(compute_shards)
            pending: dict[Any, tuple[str, list[int]]] = {}
            while todo or pending:
                while todo and (workers is None or len(pending) < workers):
                    item = todo.pop(0)
                    pending[remote.remote(*args(item))] = (item[0], item[1])
                ready, _ = ray.wait(list(pending), num_returns=1)
                split, i = pending.pop(ready[0])
                try:
                    out = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # keep collecting: finished shards must be written
                    failed(split, i, exc)
                    continue
                done(split, i, out)
        if mistakes:  # the other shards are written and kept, as for a failure
            raise mistakes[0]
        if failures:
            raise ShardFailed(f"{len(failures)} of {total} soft-target shards failed after {max_retries} "
                              f"retries; the {total - len(failures)} others are written and stay under "
                              f"{self.uri(key)}, and a rerun computes only the missing ones:\n  "
                              + "\n  ".join(failures))
        return computed, forward_rows


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
