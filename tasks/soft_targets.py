"""The soft-target store: teacher outputs computed once by Ray tasks, kept as Parquet shards + a manifest.

Layout under the storage root:

    soft_targets/<key>/manifest.json                 written last; its presence means "complete"
    soft_targets/<key>/<split>/part-00003-of-00008.parquet

The key hashes everything the targets depend on (teacher weights, data fingerprint and split,
preprocessing, format, dtype, top_k, ensemble rule), so a rerun with the same inputs finds the shards
and runs no teacher forward, and any change lands under a new key. Shards are written whole (see
`Storage.write_bytes`), so after an interruption only the missing shards are computed.
Temperature is never baked in: the shards hold logits at T=1 (or top-k logits + tail log-mass).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from orchestrator.errors import UserError
from tasks.storage import Storage, sha256_bytes
from tasks.target_formats import decode_topk, encode_topk

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")


class ShardFailed(RuntimeError):
    """A shard kept failing after its retries; the shards already written stay."""


def cache_key(teacher_digests: list[str], data_fingerprint: str, format: str, dtype: str, top_k: int | None,
              ensemble: str) -> str:
    payload = json.dumps({"v": MANIFEST_VERSION, "teachers": teacher_digests, "data": data_fingerprint,
                          "format": format, "dtype": dtype, "top_k": top_k if format == "topk" else None,
                          "ensemble": ensemble if len(teacher_digests) > 1 else None}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def shard_ranges(rows: int, shards: int) -> list[tuple[int, int]]:
    shards = max(1, min(shards, rows))
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.parquet"


# ---------------------------------------------------------------- encoding rows <-> Arrow


def _fixed_list(arr: np.ndarray, value_type: pa.DataType) -> pa.Array:
    n, width = arr.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=value_type), width)


def _store_array(t: torch.Tensor, dtype: str) -> pa.Array:
    """float32/float16 as Arrow floats; bfloat16 as its raw 16 bits (Arrow has no bfloat16)."""
    if dtype == "bfloat16":
        return _fixed_list(t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), pa.uint16())
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    return _fixed_list(t.float().numpy().astype(np_dtype), pa.from_numpy_dtype(np_dtype))


def _load_array(col: pa.ChunkedArray, dtype: str) -> torch.Tensor:
    arr = col.combine_chunks()
    width = arr.type.list_size
    flat = arr.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    if dtype == "bfloat16":
        return torch.from_numpy(flat.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(flat, copy=True))


def encode_rows(row_ids: np.ndarray, x: np.ndarray, y: np.ndarray, logits: torch.Tensor, format: str,
                dtype: str, top_k: int | None) -> bytes:
    cols: dict[str, pa.Array] = {
        "row_id": pa.array(row_ids, type=pa.int64()),
        "x": _fixed_list(x.astype(np.float32), pa.float32()),
        "label": pa.array(y, type=pa.int64()),
    }
    if format == "logits":
        cols["logits"] = _store_array(logits, dtype)
    else:
        values, indices, tail = encode_topk(logits.float(), int(top_k or 1))
        cols["topk_values"] = _store_array(values, dtype)
        cols["topk_indices"] = _fixed_list(indices.numpy().astype(np.int32), pa.int32())
        cols["tail_logmass"] = pa.array(tail.numpy().astype(np.float32), type=pa.float32())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    return buf.getvalue()


@dataclass
class TargetBatch:
    """A split's rows as tensors, teacher targets kept in their stored dtype until used."""

    row_id: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor | slice) -> TargetBatch:
        return TargetBatch(self.row_id[idx], self.x[idx], self.y[idx], {k: v[idx] for k, v in self.targets.items()})

    @staticmethod
    def concat(parts: list[TargetBatch]) -> TargetBatch:
        return TargetBatch(torch.cat([p.row_id for p in parts]), torch.cat([p.x for p in parts]),
                           torch.cat([p.y for p in parts]),
                           {k: torch.cat([p.targets[k] for p in parts]) for k in parts[0].targets})


def teacher_logits(targets: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Dense float32 teacher logits at T=1 from either stored format."""
    if "logits" in targets:
        return targets["logits"].float()
    return decode_topk(targets["topk_values"].float(), targets["topk_indices"], targets["tail_logmass"].float(),
                       num_classes)


def decode_rows(data: bytes, dtype: str) -> TargetBatch:
    table = pq.read_table(io.BytesIO(data))
    targets: dict[str, torch.Tensor] = {}
    if "logits" in table.column_names:
        targets["logits"] = _load_array(table.column("logits"), dtype)
    else:
        targets["topk_values"] = _load_array(table.column("topk_values"), dtype)
        targets["topk_indices"] = _load_array(table.column("topk_indices"), "int32")
        targets["tail_logmass"] = torch.from_numpy(table.column("tail_logmass").to_numpy())
    return TargetBatch(
        row_id=torch.from_numpy(table.column("row_id").to_numpy()),
        x=_load_array(table.column("x"), "float32"),
        y=torch.from_numpy(table.column("label").to_numpy()),
        targets=targets,
    )


# ---------------------------------------------------------------- teacher forward (one Ray task per shard)


def ensemble_logits(teachers: list[torch.nn.Module], x: torch.Tensor, rule: str) -> torch.Tensor:
    outs = [t(x).float() for t in teachers]
    if len(outs) == 1:
        return outs[0]
    stacked = torch.stack(outs)
    if rule == "mean_logits":
        return stacked.mean(0)
    # log of the mean probability: a proper distribution whose softmax_T is well defined at any T
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - float(np.log(len(outs)))


def teacher_forward(teachers: list[torch.nn.Module], x: np.ndarray, rule: str, batch: int = 4096) -> torch.Tensor:
    for t in teachers:
        t.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(ensemble_logits(teachers, torch.from_numpy(np.array(x[i:i + batch])), rule))
    return torch.cat(outs) if outs else torch.zeros(0)


def compute_shard(storage: Storage, path: str, teachers: list[torch.nn.Module], x: np.ndarray, y: np.ndarray,
                  start: int, stop: int, row_offset: int, format: str, dtype: str, top_k: int | None,
                  ensemble: str) -> dict[str, Any]:
    """Run the teacher(s) over rows [start, stop) and write one shard; returns its manifest entry."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    logits = teacher_forward(teachers, x[start:stop], ensemble)
    data = encode_rows(np.arange(row_offset + start, row_offset + stop), x[start:stop], y[start:stop], logits,
                       format, dtype, top_k)
    storage.write_bytes(path, data)
    return {"rows": stop - start, "bytes": len(data), "sha256": sha256_bytes(data),
            "forward_rows": stop - start, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- the store


class SoftTargetStore:
    """Reads, lists and removes stored soft targets; `precompute` fills it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def dir(self, key: str) -> str:
        return self.storage.path("soft_targets", key)

    def uri(self, key: str) -> str:
        return self.storage.uri("soft_targets", key)

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a complete entry, or None when the entry is missing or incomplete."""
        path = f"{self.dir(key)}/manifest.json"
        if not self.storage.exists(path):
            return None
        try:
            m = json.loads(self.storage.read_bytes(path))
        except json.JSONDecodeError:
            raise UserError("manifest is not valid JSON", where=self.storage._display(path)) from None
        if m.get("version") != MANIFEST_VERSION or m.get("key") != key:
            raise UserError(f"manifest is for {m.get('key')!r} version {m.get('version')}, expected {key!r} "
                            f"version {MANIFEST_VERSION}", where=self.storage._display(path))
        return m

    def require(self, key: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        m = self.manifest(key)
        if m is None:
            raise UserError("no complete manifest: these soft targets were never finished (rerun the workflow)",
                            where=self.uri(key))
        for k, v in (expect or {}).items():
            if m.get(k) != v:
                raise UserError(f"manifest says {k}={m.get(k)!r} but the run expects {v!r}; refusing to mix",
                                where=self.uri(key))
        return m

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for path in self.storage.ls(self.storage.path("soft_targets")):
            key = path.rstrip("/").split("/")[-1]
            m = self.manifest(key)
            out.append({"key": key, "uri": self.uri(key), "complete": m is not None,
                        **({k: m[k] for k in ("format", "dtype", "top_k", "rows", "bytes", "created_at",
                                              "num_classes")} if m else {})})
        return out

    def remove(self, key: str) -> bool:
        if not self.storage.exists(self.dir(key)):
            return False
        self.storage.rm(self.dir(key))
        return True

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
            path = f"{self.dir(manifest['key'])}/{shard['path']}"
            data = self.storage.read_bytes(path)
            if verify and sha256_bytes(data) != shard["sha256"]:
                raise UserError("checksum mismatch: the shard is corrupted (remove the entry with "
                                f"`kdflow cache rm {manifest['key']}` to recompute)", where=self.storage._display(path))
            batch = decode_rows(data, manifest["dtype"])
            parts.append(batch.take(slice(max(start, a) - a, min(stop, b) - a)))
        if not parts:
            raise UserError(f"no rows in [{start}, {stop}) of split {split}", where=self.uri(manifest["key"]))
        return TargetBatch.concat(parts)

    def precompute(self, key: str, teachers: list[torch.nn.Module], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                   *, shards: int, format: str, dtype: str, top_k: int | None, ensemble: str,
                   meta: dict[str, Any], max_retries: int = 3,
                   on_shard: Callable[[str, int, int, bool], None] | None = None) -> dict[str, Any]:
        """Compute the missing shards with Ray tasks and write the manifest last. Returns the manifest."""
        import ray

        existing = self.manifest(key)
        if existing is not None:
            return {**existing, "reused": True, "computed_shards": 0, "forward_rows": 0}

        remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(compute_shard)
        teachers_ref = ray.put(teachers)
        plan: dict[str, list[dict[str, Any]]] = {}
        pending: dict[Any, tuple[str, int]] = {}
        total = 0
        offset = 0
        for split in SPLITS:
            x, y = splits[split]
            n_shards = shards if split == "train" else max(1, min(shards, int(np.ceil(len(y) / 50_000))))
            ranges = shard_ranges(len(y), n_shards)
            plan[split] = []
            x_ref, y_ref = ray.put(x), ray.put(y)
            for i, (a, b) in enumerate(ranges):
                rel = shard_name(split, i, len(ranges))
                entry = {"path": rel, "row_start": a, "row_stop": b, "rows": b - a, "row_id_offset": offset}
                plan[split].append(entry)
                total += 1
                path = f"{self.dir(key)}/{rel}"
                if self.storage.exists(path):
                    data = self.storage.read_bytes(path)
                    entry.update(bytes=len(data), sha256=sha256_bytes(data))
                    if on_shard:
                        on_shard(split, i, len(ranges), True)
                    continue
                ref = remote.remote(self.storage, path, teachers_ref, x_ref, y_ref, a, b, offset, format, dtype,
                                    top_k, ensemble)
                pending[ref] = (split, i)
            offset += len(y)

        computed, forward_rows, failures = 0, 0, []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            split, i = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as exc:  # keep collecting: finished shards must still be written
                failures.append(f"{shard_name(split, i, len(plan[split]))}: {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
                continue
            plan[split][i].update(bytes=out["bytes"], sha256=out["sha256"])
            computed += 1
            forward_rows += out["forward_rows"]
            if on_shard:
                on_shard(split, i, len(plan[split]), False)
        if failures:
            raise ShardFailed(f"{len(failures)} of {total} soft-target shards failed after {max_retries} retries "
                              f"(the {total - len(failures)} written stay under {self.uri(key)}):\n  "
                              + "\n  ".join(failures))

        manifest = {
            "version": MANIFEST_VERSION, "key": key, "format": format, "dtype": dtype,
            "top_k": top_k if format == "topk" else None, "ensemble": ensemble,
            "splits": {s: {"rows": int(len(splits[s][1])), "shards": plan[s]} for s in SPLITS},
            "rows": int(sum(len(splits[s][1]) for s in SPLITS)),
            "bytes": int(sum(e["bytes"] for s in SPLITS for e in plan[s])),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **meta,
        }
        self.storage.write_bytes(f"{self.dir(key)}/manifest.json", json.dumps(manifest, indent=1).encode())
        return {**manifest, "reused": False, "computed_shards": computed, "forward_rows": forward_rows}
