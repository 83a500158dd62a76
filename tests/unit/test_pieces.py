"""A source read as pieces: the hash split by row id, the reduction pass (counts, mean/std, classes, digests),
the fingerprint, and a file that changes between the reduction and the read (tasks/pieces.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import pieces
from tasks.dataset import Dataset, list_parquet
from tasks.errors import UserError
from tasks.kinds.classification.data import load_dataset
from tasks.pieces import SPLIT_CODES, Reader, SourceChanged, fill, scan, scan_piece, split_codes

FEATURES = ["rid", "f0", "f1"]
SPLIT = {"seed": 3, "val": 0.2, "test": 0.25}


def write_part(path: Path, first_id: int, rows: int, row_group: int) -> pa.Table:
    """Rows with a unique integer id feature (`rid`, exact in float32), two random features and a string label."""
    rng = np.random.default_rng(first_id)
    table = pa.table({"rid": np.arange(first_id, first_id + rows, dtype=np.int64),
                      "f0": rng.normal(3.0, 2.0, rows), "f1": rng.uniform(-1, 5, rows).astype(np.float32),
                      "label": rng.choice(["cat", "dog", "eel"], rows)})
    pq.write_table(table, path, row_group_size=row_group)
    return table


def source(tmp_path: Path, parts: dict[str, tuple[int, int]]) -> str:
    for name, (first, rows) in parts.items():
        write_part(tmp_path / name, first, rows, row_group=37)
    return str(tmp_path / "part-*.parquet")


def by_split(d: Dataset, column: int = 0) -> dict[str, set[int]]:
    """The row ids in each split of a loaded dataset (the standardization undone on the id column)."""
    return {k: set(np.rint(d.x[k][:, column] * d.std[column] + d.mean[column]).astype(int).tolist())
            for k in ("train", "val", "test")}


def test_a_rows_split_is_the_same_from_the_whole_file_or_any_piece_of_it() -> None:
    whole = split_codes("part-1.parquet", 0, 5000, **SPLIT)
    for a, b in [(0, 1), (17, 400), (1234, 5000), (4999, 5000)]:
        np.testing.assert_array_equal(split_codes("part-1.parquet", a, b - a, **SPLIT), whole[a:b])
    # every split is used, near its fraction; another seed or file name is another draw
    frac = np.bincount(whole, minlength=3) / len(whole)
    np.testing.assert_allclose(frac, [0.55, 0.2, 0.25], atol=0.03)
    assert (split_codes("part-2.parquet", 0, 5000, **SPLIT) != whole).mean() > 0.3
    assert (split_codes("part-1.parquet", 0, 5000, **{**SPLIT, "seed": 4}) != whole).mean() > 0.3


def test_the_reduction_equals_numpy_over_the_materialised_splits_of_a_multi_file_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(tmp_path, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250), "part-2.parquet": (550, 90)})
    listed = list_parquet(src, None, "source")
    assert len({p.path for p in listed.pieces}) == 3 and len(listed.pieces) == 9 + 7 + 3  # 37-row row groups

    d = load_dataset(src, features=FEATURES, **SPLIT)

    # the same splits from the files read whole, each row's split from (seed, file name, row index)
    raw = {k: [] for k in SPLIT_CODES}
    labels = {k: [] for k in SPLIT_CODES}
    for name in ("part-0.parquet", "part-1.parquet", "part-2.parquet"):
        t = pq.read_table(tmp_path / name)
        x = np.stack([t.column(c).to_numpy().astype(np.float32) for c in FEATURES], axis=1)
        codes = split_codes(name, 0, len(x), **SPLIT)
        for k, c in SPLIT_CODES.items():
            raw[k].append(x[codes == c])
            labels[k].append(t.column("label").to_numpy(zero_copy_only=False)[codes == c])
    raw = {k: np.concatenate(v) for k, v in raw.items()}
    assert {k: d.rows(k) for k in SPLIT_CODES} == {k: len(v) for k, v in raw.items()}
    np.testing.assert_allclose(d.mean, raw["train"].astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(d.std, raw["train"].astype(np.float64).std(axis=0), rtol=1e-6)
    assert d.classes == ["cat", "dog", "eel"]
    for k in SPLIT_CODES:
        np.testing.assert_allclose(d.x[k], (raw[k] - d.mean) / d.std, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.array(d.classes)[d.y[k]], np.concatenate(labels[k]))
    # one thread or several, whole row groups or 10-row chunks of them: the same arrays and fingerprint
    monkeypatch.setattr(pieces, "CHUNK_ROWS", 10)
    alone = load_dataset(src, features=FEATURES, threads=3, **SPLIT)
    assert alone.fingerprint == d.fingerprint
    for k in SPLIT_CODES:
        np.testing.assert_allclose(alone.x[k], d.x[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(alone.y[k], d.y[k])


def test_the_reduction_equals_numpy_on_digits() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    codes = split_codes("", 0, len(y), seed=0, val=0.15, test=0.15)
    d = load_dataset("sklearn:digits")
    train = x[codes == 0].astype(np.float64)  # the reduction is float64: so is the reference
    assert {k: d.rows(k) for k in SPLIT_CODES} == {k: int((codes == c).sum()) for k, c in SPLIT_CODES.items()}
    np.testing.assert_allclose(d.mean, train.mean(axis=0), rtol=1e-6, atol=1e-7)
    std = train.std(axis=0)
    np.testing.assert_allclose(d.std, np.where(std < 1e-6, 1.0, std), rtol=1e-6)
    assert d.classes == list(range(10))
    for k, c in SPLIT_CODES.items():
        np.testing.assert_array_equal(d.y[k], y[codes == c])


def test_appending_a_file_moves_no_old_row_and_keeps_the_old_pieces_digests(tmp_path: Path) -> None:
    src = source(tmp_path, {"part-1.parquet": (0, 200), "part-2.parquet": (200, 150)})
    before = load_dataset(src, features=FEATURES, **SPLIT)
    reader = Reader(url=src, columns=FEATURES, label="label")
    old = {(p.name, p.row_group): scan_piece(reader, p, **SPLIT) for p in list_parquet(src, None, "source").pieces}

    # a new file that sorts *first*: a row's id is its file's name, not the file's position in the listing
    write_part(tmp_path / "part-0.parquet", 1000, 120, row_group=37)
    after = load_dataset(src, features=FEATURES, **SPLIT)
    old_ids = set(range(350))
    was, now = by_split(before), by_split(after)
    for k in SPLIT_CODES:
        assert now[k] & old_ids == was[k], k
    assert sum(len(now[k] - old_ids) for k in SPLIT_CODES) == 120
    new = {(p.name, p.row_group): scan_piece(reader, p, **SPLIT) for p in list_parquet(src, None, "source").pieces}
    assert all(new[k].digest == s.digest and new[k].counts == s.counts for k, s in old.items())
    assert after.fingerprint != before.fingerprint


def test_changing_one_value_in_one_row_changes_the_fingerprint(tmp_path: Path) -> None:
    src = source(tmp_path, {"part-0.parquet": (0, 200), "part-1.parquet": (200, 150)})
    before = load_dataset(src, features=FEATURES, **SPLIT)
    assert load_dataset(src, features=FEATURES, **SPLIT).fingerprint == before.fingerprint
    t = pq.read_table(tmp_path / "part-1.parquet")
    f1 = t.column("f1").to_numpy().copy()
    f1[101] = np.nextafter(f1[101], np.float32(np.inf))  # the smallest change a float32 can make
    pq.write_table(t.set_column(2, "f1", pa.array(f1)), tmp_path / "part-1.parquet", row_group_size=37)
    assert load_dataset(src, features=FEATURES, **SPLIT).fingerprint != before.fingerprint

    labels = t.column("label").to_pylist()
    labels[5] = "dog" if labels[5] != "dog" else "cat"
    pq.write_table(t.set_column(3, "label", pa.array(labels)), tmp_path / "part-1.parquet", row_group_size=37)
    assert load_dataset(src, features=FEATURES, **SPLIT).fingerprint != before.fingerprint


def test_a_file_changed_between_the_reduction_and_the_read_is_refused(tmp_path: Path) -> None:
    src = source(tmp_path, {"part-0.parquet": (0, 200), "part-1.parquet": (200, 150)})
    listed = list_parquet(src, None, "source")
    reader = Reader(url=src, columns=FEATURES, label="label")
    reduced = scan(reader, listed.pieces, **SPLIT)
    t = pq.read_table(tmp_path / "part-0.parquet")
    f0 = t.column("f0").to_numpy().copy()
    f0[150] += 1.0
    pq.write_table(t.set_column(1, "f0", pa.array(f0)), tmp_path / "part-0.parquet", row_group_size=37)
    mean, std = reduced.mean.astype(np.float32), np.sqrt(reduced.var).astype(np.float32)
    with pytest.raises(SourceChanged) as err:
        fill(reader, listed.pieces, reduced, mean=mean, std=std, **SPLIT)
    assert err.value.where == "source" and "part-0.parquet (row group 4) changed while this run read it" in str(err.value)

    # a file cut short (fewer row groups) is the same error, not an index error
    pq.write_table(t.slice(0, 40), tmp_path / "part-0.parquet", row_group_size=37)
    with pytest.raises(UserError, match="changed while this run read it"):
        fill(reader, listed.pieces, reduced, mean=mean, std=std, **SPLIT)


def test_too_few_rows_for_the_split_names_split(tmp_path: Path) -> None:
    write_part(tmp_path / "t.parquet", 0, 3, row_group=37)
    with pytest.raises(UserError) as err:
        load_dataset(str(tmp_path / "t.parquet"), features=FEATURES, val=0.3, test=0.3)
    assert err.value.where == "split" and "too few for this split" in str(err.value)


def test_a_split_read_by_row_range_from_the_pieces_is_the_drivers_split(tmp_path: Path) -> None:
    src = source(tmp_path, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})
    d = load_dataset(src, features=FEATURES, **SPLIT)
    assert set(d.source_rows) == set(SPLIT_CODES) and load_dataset("sklearn:digits").source_rows == {}
    for k, rows in d.source_rows.items():
        n = d.rows(k)
        assert len(rows) == n
        for a, b in [(0, n), (0, 1), (n - 1, n), (n // 3, 2 * n // 3), (5, 5)]:
            x, y = rows.rows(a, b)
            np.testing.assert_array_equal(x, d.x[k][a:b])  # the same bits: shards do not depend on the reader
            np.testing.assert_array_equal(y, d.y[k][a:b])

    t = pq.read_table(tmp_path / "part-1.parquet")
    pq.write_table(t.slice(0, 249), tmp_path / "part-1.parquet", row_group_size=37)  # one row fewer
    with pytest.raises(SourceChanged):
        d.source_rows["train"].rows(0, d.rows("train"))


def test_source_rows_load_the_splits_rows_bit_for_bit_in_blocks_cut_at_piece_boundaries(tmp_path: Path) -> None:
    import torch

    from tasks.train.sources import SourceRows

    src = source(tmp_path, {"part-0.parquet": (0, 300), "part-1.parquet": (300, 250)})  # 15 row groups of <= 37
    d = load_dataset(src, features=FEATURES, **SPLIT)
    for k, split in d.source_rows.items():
        rows, n = SourceRows(split), d.rows(k)
        assert rows.rows() == n
        # where one piece's rows of this split end, in split indices
        ends = set(np.cumsum(split.counts).tolist())
        assert len(ends) > 5  # many pieces, so the cuts below are tested
        for a, b in [(0, n), (0, 1), (n - 1, n), (n // 3, 2 * n // 3), (7, 8), (5, 5)]:
            batch = rows.load(a, b)
            assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64 and batch.targets == {}
            assert torch.equal(batch.row_id, torch.arange(a, b))  # split indices, as an ArraySource's
            assert torch.equal(batch.x, torch.from_numpy(d.x[k][a:b]))  # the driver's arrays, bit for bit
            assert torch.equal(batch.y, torch.from_numpy(d.y[k][a:b]))
            assert rows.stored_bytes(a, b) == (b - a) * (len(FEATURES) * 4 + 8)
            blocks = rows.blocks(a, b)
            if a == b:
                assert blocks == []
                continue
            # [a, b) exactly, cut at every piece end inside it and nowhere else, no empty block
            assert [lo for lo, _ in blocks] == sorted({a, *(e for e in ends if a < e < b)})
            assert [hi for _, hi in blocks] == sorted({b, *(e for e in ends if a < e < b)})


def test_a_rows_id_is_its_files_name_under_the_source_however_the_source_is_spelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    source(tmp_path / "data", {"part-0.parquet": (0, 120), "part-1.parquet": (120, 80)})
    monkeypatch.chdir(tmp_path)
    spellings = ["data/part-*.parquet", "./data/part-*.parquet", str(tmp_path / "data" / "part-*.parquet"), "data/",
                 str(tmp_path / "data") + "/"]
    listed = [list_parquet(s, None, "source").pieces for s in spellings]
    assert all(p == listed[0] for p in listed)  # absolute paths: a Ray task elsewhere opens the same files
    assert {p.name for p in listed[0]} == {"part-0.parquet", "part-1.parquet"}
    assert len({load_dataset(s, features=FEATURES, **SPLIT).fingerprint for s in spellings}) == 1
