"""The soft-target store: teacher outputs computed once, kept as Parquet shards + a manifest.

Layout under the storage root:

    soft_targets/<key>/manifest.json                 written last; its presence means "complete"
    soft_targets/<key>/<split>/part-00003-of-00008.parquet

The key hashes everything the targets depend on (teacher weights, data fingerprint and split,
preprocessing, format, dtype, top_k, ensemble rule), so a rerun with the same inputs finds the shards
and runs no teacher forward, and any change lands under a new key. Shards are written whole (see
`Storage.write_bytes`), so after an interruption only the missing shards are computed
(tasks/store/precompute.py). Every row carries its `row_id` (0..N-1 over train, val, test in that order),
which readers check against the manifest. Temperature is never baked in: the shards hold logits at T=1
(or top-k logits + tail log-mass).

A manifest is trusted only when it is whole: right version and key, and per split shards that tile
[0, rows) with a size and checksum each. Anything else is an error naming the object; nothing is
deleted on the way (`kdflow cache rm KEY` is the one way to drop an entry).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tasks.errors import UserError
from tasks.layout import SOFT_TARGETS
from tasks.storage import Storage, sha256_bytes
from tasks.store.formats import FORMATS, TORCH_DTYPES
from tasks.store.shards import TargetBatch, decode_rows

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
# what `kdflow cache list` shows of an entry
LISTED = ("format", "dtype", "top_k", "rows", "bytes", "created_at", "task", "teachers")


def cache_key(teacher_digests: list[str], data_fingerprint: str, format: str, dtype: str, top_k: int | None,
              ensemble: str) -> str:
    """The entry's name: a hash of everything the stored rows depend on (teacher order does not matter);
    `top_k` is the ids kept per row (k for topk, the draws N for sampled)."""
    payload = json.dumps({"v": MANIFEST_VERSION, "teachers": sorted(teacher_digests), "data": data_fingerprint,
                          "format": format, "dtype": dtype, "top_k": top_k if format == "topk" else None,
                          **({"samples": top_k} if format == "sampled" else {}),
                          "ensemble": ensemble if len(teacher_digests) > 1 else None}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    shards = max(1, min(shards, rows))
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


class SoftTargetStore:
    """Reads, lists, verifies and removes stored soft targets (tasks/store/precompute.py fills it)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def dir(self, key: str) -> str:
        return self.storage.path(SOFT_TARGETS, key)

    def uri(self, key: str) -> str:
        return self.storage.uri(SOFT_TARGETS, key)

    def shard_path(self, key: str, rel: str) -> str:
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
                        **({k: m.get(k) for k in LISTED} if m else {})})
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
        path = self.shard_path(key, shard["path"])
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
            path = self.shard_path(manifest["key"], shard["path"])
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
