"""Datasets: built-ins with generated transfer rows, the user's Parquet tables, fingerprints, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import UserError
from tasks.kinds.classification.data import load_dataset


def test_mnist1d_transfer_rows_are_new_unlabeled_rows_that_leave_the_labeled_splits_alone() -> None:
    plain = load_dataset("mnist1d", val=0.1, test=0.2)
    extra = load_dataset("mnist1d", val=0.1, test=0.2, transfer=300)

    # the split is a hash of (seed, row index) against the fractions: near 70/10/20 of 5000, not exactly
    rows = {k: plain.rows(k) for k in ("train", "val", "test")}
    assert sum(rows.values()) == 5000
    assert abs(rows["train"] - 3500) < 130 and abs(rows["val"] - 500) < 90 and abs(rows["test"] - 1000) < 115
    assert extra.rows("transfer") == 300 and (extra.y["transfer"] == -1).all()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(extra.x[split], plain.x[split])
        np.testing.assert_array_equal(extra.y[split], plain.y[split])
    np.testing.assert_array_equal(extra.mean, plain.mean)  # standardized with the labeled train rows only
    labeled = np.concatenate([plain.x[s] for s in ("train", "val", "test")])
    assert not (extra.x["transfer"][:, None, :] == labeled[None, :, :]).all(-1).any()  # no row is a copy
    assert len(np.unique(extra.x["transfer"], axis=0)) == 300

    # the soft targets depend on the transfer rows; a teacher trained here does not
    assert extra.fingerprint != plain.fingerprint
    assert extra.labeled_fingerprint == plain.labeled_fingerprint == plain.fingerprint
    again = load_dataset("mnist1d", val=0.1, test=0.2, transfer=300)
    assert again.fingerprint == extra.fingerprint
    assert load_dataset("mnist1d", val=0.1, test=0.2, transfer=301).fingerprint != extra.fingerprint


def test_split_seed_and_limit_change_the_fingerprint() -> None:
    base = load_dataset("sklearn:digits")
    assert load_dataset("sklearn:digits").fingerprint == base.fingerprint
    assert len({base.fingerprint, load_dataset("sklearn:digits", seed=1).fingerprint,
                load_dataset("sklearn:digits", val=0.2).fingerprint,
                load_dataset("sklearn:digits", limit=1000).fingerprint}) == 4


def write_table(path: Path, rows: int, seed: int = 0, label: bool = True, order: list[str] | None = None) -> None:
    rng = np.random.default_rng(seed)
    cols = {"f0": rng.normal(size=rows), "f1": rng.normal(size=rows).astype(np.float32),
            "f2": rng.integers(0, 5, rows), "name": [f"r{i}" for i in range(rows)]}
    if label:
        cols["label"] = rng.choice(["cat", "dog", "eel"], rows)
    table = pa.table(cols)
    pq.write_table(table.select(order) if order else table, path)


def test_parquet_transfer_rows_use_the_labeled_tables_feature_columns(tmp_path: Path) -> None:
    write_table(tmp_path / "part-0.parquet", 120, seed=0)
    write_table(tmp_path / "part-1.parquet", 80, seed=1)
    # the transfer table: other column order, no label, the string column still there
    write_table(tmp_path / "unlabeled.parquet", 50, seed=2, label=False, order=["name", "f2", "f1", "f0"])

    d = load_dataset(str(tmp_path / "part-*.parquet"), transfer=str(tmp_path / "unlabeled.parquet"))
    assert d.num_features == 3 and d.classes == ["cat", "dog", "eel"] and d.num_classes == 3
    assert sum(d.rows(s) for s in ("train", "val", "test")) == 200 and d.rows("transfer") == 50
    raw = pq.read_table(tmp_path / "unlabeled.parquet")
    want = np.stack([raw.column(c).to_numpy().astype(np.float32) for c in ("f0", "f1", "f2")], axis=1)
    np.testing.assert_allclose(d.x["transfer"], (want - d.mean) / d.std, rtol=1e-6, atol=1e-6)

    listed = load_dataset(str(tmp_path / "part-*.parquet"), features=["f2", "f0"])
    assert listed.num_features == 2


def test_parquet_array_column_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7)).astype(np.float32)
    pq.write_table(pa.table({"pixels": list(x), "label": rng.integers(0, 3, 60)}), tmp_path / "t.parquet")
    d = load_dataset(str(tmp_path / "t.parquet"), features="pixels")
    assert d.num_features == 7
    restored = np.concatenate([d.x[s] for s in ("train", "val", "test")]) * d.std + d.mean
    np.testing.assert_allclose(np.sort(restored, axis=0), np.sort(x, axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,where,message", [
    ({"source": "PARQUET", "label": "kind"}, "label", "label column 'kind' not in the table"),
    ({"source": "PARQUET", "features": ["f0", "nope"]}, "features", "columns not in the table: ['nope']"),
    ({"source": "PARQUET", "features": ["f0", "name"]}, "features", "column 'name' is string, not numeric"),
    ({"source": "PARQUET", "features": "f0"}, "features", "not a list/array column"),
    ({"source": "PARQUET", "transfer": 100}, "transfer", "transfer is a Parquet source too"),
    ({"source": "PARQUET", "transfer": "NARROW"}, "transfer", "lack the feature columns ['f1', 'f2']"),
    ({"source": "DIR/none-*.parquet"}, "source", "no files match"),
    ({"source": "DIR/missing.parquet"}, "source", "no such file or folder"),
    ({"source": "DIR/not-parquet.parquet"}, "source", "cannot read Parquet"),
    ({"source": "sklearn:digits", "transfer": 100}, "transfer", "no generator for transfer rows"),
    ({"source": "mnist1d", "transfer": "x.parquet"}, "transfer", "a number of extra generated rows"),
    ({"source": "imagenet"}, "source", "unknown source 'imagenet'"),
])
def test_bad_data_input_names_the_key(tmp_path: Path, kwargs: dict, where: str, message: str) -> None:
    write_table(tmp_path / "t.parquet", 40)
    pq.write_table(pa.table({"f0": [1.0] * 40, "label": [0, 1] * 20}), tmp_path / "narrow.parquet")
    (tmp_path / "not-parquet.parquet").write_text("hello")
    paths = {"PARQUET": str(tmp_path / "t.parquet"), "NARROW": str(tmp_path / "narrow.parquet")}
    kwargs = {k: paths.get(v, v.replace("DIR", str(tmp_path))) if isinstance(v, str) else v
              for k, v in kwargs.items()}
    with pytest.raises(UserError) as err:
        load_dataset(**kwargs)
    assert err.value.where == where and message in str(err.value)


def test_columns_keep_the_users_names_and_bad_values_name_their_column_and_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 3)).astype(np.float32)
    pq.write_table(pa.table({"emb": list(emb), "label": rng.integers(0, 2, 30).astype(np.float64)}),
                   tmp_path / "emb.parquet")
    d = load_dataset(str(tmp_path / "emb.parquet"), features="emb")
    assert d.feature_names == ["emb[0]", "emb[1]", "emb[2]"]  # not x0, x1, ...: the served model's columns too
    assert d.classes == [0, 1] and all(isinstance(c, int) for c in d.classes)  # whole floats are classes

    emb[5, 2] = np.nan
    pq.write_table(pa.table({"emb": list(emb), "label": [0, 1] * 15}), tmp_path / "emb.parquet")
    with pytest.raises(UserError, match=r"column 'emb\[2\]' is nan at row 5 of emb.parquet") as err:
        load_dataset(str(tmp_path / "emb.parquet"), features="emb")
    assert err.value.where == "features"
    f1 = rng.normal(size=30)
    f1[17] = np.inf
    pq.write_table(pa.table({"f0": rng.normal(size=30), "f1": f1, "label": [0, 1] * 15}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match="column 'f1' is inf at row 17 of t.parquet"):
        load_dataset(str(tmp_path / "t.parquet"))

    pq.write_table(pa.table({"f0": rng.normal(size=30), "label": [0.0, 1.5] * 15}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match="label column 'label' holds 1.5") as err:
        load_dataset(str(tmp_path / "t.parquet"))
    assert err.value.where == "label"


def test_builtin_digits_read_from_sklearns_file_are_load_digits() -> None:
    """kdflow reads the digits CSV itself (importing scikit-learn costs a run seconds): same values, same dtypes."""
    from sklearn.datasets import load_digits

    from tasks.dataset import sklearn_digits

    x, y = sklearn_digits()
    d = load_digits()
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, d.data.astype(np.float32)) and np.array_equal(y, d.target)
