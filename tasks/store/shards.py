"""One shard's bytes: a block of rows (row ids, features, labels, teacher outputs) <-> a Parquet file.

Teacher outputs keep their storage dtype until used: float32/float16 as Arrow floats, bfloat16 as its raw
16 bits (Arrow has no bfloat16); top-k as values + int32 class ids + float32 tail log-mass.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.store.formats import encode_sampled, encode_topk, id_type_bytes

FLOAT16_MAX = 65504.0


def _fixed_list(arr: np.ndarray, value_type: pa.DataType) -> pa.Array:
    width = arr.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1), type=value_type), width)


def _store_array(t: torch.Tensor, dtype: str) -> pa.Array:
    """float32/float16 as Arrow floats; bfloat16 as its raw 16 bits (Arrow has no bfloat16)."""
    if dtype == "bfloat16":
        return _fixed_list(t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), pa.uint16())
    if dtype == "float16":  # an overflow would be inf, and softmax of inf is NaN
        return _fixed_list(t.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).numpy().astype(np.float16), pa.float16())
    return _fixed_list(t.float().numpy().astype(np.float32), pa.float32())


def _value_type(dtype: str) -> pa.DataType:
    return {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype]


def shard_schema_problem(schema: pa.Schema, format: str, dtype: str) -> str | None:
    """Why a shard's columns do not hold `format` in `dtype`, or None when they do."""
    target = "logits" if format == "logits" else "topk_values"
    want = {"row_id", "x", "label"} | {"logits": {"logits"}, "topk": {"topk_values", "topk_indices", "tail_logmass"},
                                       "sampled": {"sample_ids", "sample_counts"}}[format]
    if set(schema.names) != want:
        return f"columns {sorted(schema.names)}, expected {sorted(want)} for format {format!r}"
    if format != "sampled" and schema.field(target).type.value_type != _value_type(dtype):
        return f"{target} holds {schema.field(target).type.value_type}, expected {dtype}"
    return None


def _load_array(col: pa.ChunkedArray, dtype: str) -> torch.Tensor:
    arr = col.combine_chunks()
    width = arr.type.list_size
    flat = arr.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    if dtype == "bfloat16":
        return torch.from_numpy(flat.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(flat, copy=True))


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_numpy(), copy=True)


def _label_array(y: np.ndarray) -> pa.Array:
    """Class ids (int64 per row, int32 per token), or real-valued targets (float32) kept as they are."""
    if np.issubdtype(y.dtype, np.floating):
        return _fixed_list(y.astype(np.float32), pa.float32()) if y.ndim == 2 else pa.array(y, type=pa.float32())
    return _fixed_list(y.astype(np.int32), pa.int32()) if y.ndim == 2 else pa.array(y, type=pa.int64())


def encode_rows(row_ids: np.ndarray, x: np.ndarray, y: np.ndarray, logits: torch.Tensor, format: str,
                dtype: str, top_k: int | None) -> bytes:
    """One shard's Parquet bytes. Classification rows: float features, one label, logits [n, C]. Sequence
    rows (causal LMs): int token ids [n, S], labels [n, S] and logits [n, S, V], every per-token column
    flattened into one list per row (top-k: [n, S * k] values and ids, [n, S] tail log-mass)."""
    seq = logits.dim() == 3
    n = len(row_ids)
    cols: dict[str, pa.Array] = {
        "row_id": pa.array(row_ids, type=pa.int64()),
        "x": _fixed_list(x.astype(np.int32), pa.int32()) if np.issubdtype(x.dtype, np.integer)
        else _fixed_list(x.astype(np.float32), pa.float32()),
        "label": _label_array(y),
    }
    flat = logits.reshape(-1, logits.shape[-1]) if seq else logits
    # a sequence row's masked positions (label -1: prompt, padding, a conversation's other turns) keep zeros,
    # which the compression all but removes: nothing is stored for a token that is never a target
    # (per-position labels only: rows whose one label covers several stored positions, an image's views, mask none)
    masked = torch.from_numpy(np.asarray(y).reshape(-1) < 0) if seq and np.asarray(y).ndim == 2 else None
    if format == "logits":
        if masked is not None:
            flat = flat.masked_fill(masked[:, None], 0.0)
        cols["logits"] = _store_array(flat.reshape(n, -1) if seq else flat, dtype)
    elif format == "sampled":
        cols.update(_sampled_columns(flat, n if seq else None, int(top_k or 1), int(row_ids[0]) if n else 0, masked))
    else:
        values, indices, tail = encode_topk(flat.float(), int(top_k or 1))
        if masked is not None:
            values[masked], indices[masked], tail[masked] = 0.0, 0, 0.0
        if seq:
            values, indices, tail = values.reshape(n, -1), indices.reshape(n, -1), tail.reshape(n, -1)
        cols["topk_values"] = _store_array(values, dtype)
        cols["topk_indices"] = _fixed_list(indices.numpy().astype(np.int32), pa.int32())
        cols["tail_logmass"] = _fixed_list(tail.numpy().astype(np.float32), pa.float32()) if seq \
            else pa.array(tail.numpy().astype(np.float32), type=pa.float32())
    buf = io.BytesIO()
    # dictionary pages only for the integer columns that repeat (labels, top-k class ids, token ids): on the
    # float columns and the unique row ids pyarrow builds a dictionary, finds it too large and falls back,
    # which was half of a 50,000-row shard's encode (143 -> 80 ms) and made it 10% larger (RESULTS-scale.md)
    pq.write_table(pa.table(cols), buf, compression="zstd", use_dictionary=[
        c for c in cols if c in ("label", "topk_indices", "sample_ids") or (c == "x" and cols[c].type.value_type == pa.int32())])
    return buf.getvalue()


def _sampled_columns(flat: torch.Tensor, rows: int | None, n: int, seed: int, masked: torch.Tensor | None
                     ) -> dict[str, pa.Array]:
    """N teacher draws per row (per token for sequence rows, `rows` of them): ids and counts columns."""
    ids, counts = encode_sampled(flat, n, seed)
    if masked is not None:
        ids[masked], counts[masked] = 0, 0
    if rows is not None:
        ids, counts = ids.reshape(rows, -1), counts.reshape(rows, -1)
    wide = id_type_bytes(flat.shape[-1]) == 4
    return {"sample_ids": _fixed_list(ids.numpy().astype(np.int32 if wide else np.uint16),
                                      pa.int32() if wide else pa.uint16()),
            "sample_counts": _fixed_list(counts.numpy(), pa.uint8())}


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
    def empty_like(like: TargetBatch, rows: int) -> TargetBatch:
        """`rows` uninitialized rows of `like`'s columns (shapes past the first, dtypes)."""
        def new(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((rows, *t.shape[1:]), dtype=t.dtype)

        return TargetBatch(new(like.row_id), new(like.x), new(like.y), {k: new(v) for k, v in like.targets.items()})

    def put(self, idx: torch.Tensor, rows: TargetBatch) -> None:
        """Write `rows` at positions `idx` (one position per row)."""
        self.row_id[idx], self.x[idx], self.y[idx] = rows.row_id, rows.x, rows.y
        for k, v in rows.targets.items():
            self.targets[k][idx] = v

    @staticmethod
    def concat(parts: list[TargetBatch]) -> TargetBatch:
        return TargetBatch(torch.cat([p.row_id for p in parts]), torch.cat([p.x for p in parts]),
                           torch.cat([p.y for p in parts]),
                           {k: torch.cat([p.targets[k] for p in parts]) for k in parts[0].targets})


def _scalar_or_list(table: pa.Table, name: str) -> torch.Tensor:
    """A per-row column ([n]) or a per-token one (a fixed-size list per row: [n, S])."""
    if pa.types.is_fixed_size_list(table.schema.field(name).type):
        return _load_array(table.column(name), "float32")
    return torch.from_numpy(_column_numpy(table, name))


def _labels(table: pa.Table) -> torch.Tensor:
    """Integer labels as int64 (class and token ids, -1 masked); real-valued ones as float32."""
    y = _scalar_or_list(table, "label")
    return y if y.is_floating_point() else y.long()


def decode_rows(data: bytes, dtype: str) -> TargetBatch:
    table = pq.read_table(io.BytesIO(data))
    targets: dict[str, torch.Tensor] = {}
    if "logits" in table.column_names:
        targets["logits"] = _load_array(table.column("logits"), dtype)
    elif "sample_ids" in table.column_names:
        ids = table.column("sample_ids").combine_chunks()
        flat = ids.values.to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, ids.type.list_size)
        targets["sample_ids"] = torch.from_numpy(flat)
        targets["sample_counts"] = _load_array(table.column("sample_counts"), "uint8")
    else:
        targets["topk_values"] = _load_array(table.column("topk_values"), dtype)
        targets["topk_indices"] = _load_array(table.column("topk_indices"), "int32")
        targets["tail_logmass"] = _scalar_or_list(table, "tail_logmass")
    return TargetBatch(
        row_id=torch.from_numpy(_column_numpy(table, "row_id")),
        x=_load_array(table.column("x"), "float32"),
        y=_labels(table),
        targets=targets,
    )
