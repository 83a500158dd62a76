"""Splits as users keep them: `data.splits`, a folder's train/validation/test layout, Hugging Face's layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import UserError
from tasks.kinds.causal_lm.data import load_lm_data
from tasks.kinds.causal_lm.spec import CausalLMData
from tasks.kinds.classification.data import load_dataset
from tasks.splits import resolve


def table(rows: int, seed: int, offset: float = 0.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"f0": rng.normal(size=rows) + offset, "f1": rng.normal(size=rows),
                     "label": rng.choice(["cat", "dog"], rows), "text": [f"doc {seed} {i} " * 3 for i in range(rows)]})


SIZES = {"train": 40, "validation": 9, "test": 11}


def write_splits(folder: Path, pattern: str = "{}.parquet") -> dict[str, Path]:
    """One table per split, seeded by its name's length (so the splits differ), at folder/pattern."""
    out = {}
    for i, (name, rows) in enumerate(SIZES.items()):
        path = folder / pattern.format(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table(rows, seed=i, offset=10.0 * i), path)
        out[name] = path
    return out


def write_save_to_disk(folder: Path, batch_rows: int = 4) -> None:
    """A `datasets` save_to_disk folder as `DatasetDict.save_to_disk` writes it: dataset_dict.json, and per
    split its state.json, dataset_info.json and data-*.arrow Arrow IPC *stream* files (batches of rows)."""
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": [*SIZES, "unsupervised"]}))
    for i, (name, rows) in enumerate({**SIZES, "unsupervised": 5}.items()):
        t = table(rows, seed=i, offset=10.0 * i)
        (folder / name).mkdir()
        files = []
        for j, part in enumerate((t.slice(0, rows // 2), t.slice(rows // 2))):
            files.append(f"data-{j:05d}-of-00002.arrow")
            with pa.OSFile(str(folder / name / files[-1]), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
                for b in part.to_batches(max_chunksize=batch_rows):
                    w.write_batch(b)
        (folder / name / "state.json").write_text(json.dumps({"_data_files": [{"filename": f} for f in files],
                                                              "_split": name}))
        (folder / name / "dataset_info.json").write_text("{}")


def test_given_splits_keep_their_rows_and_their_identity(tmp_path: Path) -> None:
    paths = write_splits(tmp_path)
    splits = {"train": str(paths["train"]), "val": str(paths["validation"]), "test": str(paths["test"])}
    d = load_dataset("sklearn:digits", features=["f0", "f1"], splits=splits)
    assert d.counts == {"train": 40, "val": 9, "test": 11}
    raw = pq.read_table(paths["test"])
    want = np.stack([raw.column("f0").to_numpy(), raw.column("f1").to_numpy()], axis=1).astype(np.float32)
    np.testing.assert_allclose(d.x["test"], (want - d.mean) / d.std, rtol=1e-5, atol=1e-5)  # in file order
    train = pq.read_table(paths["train"])
    np.testing.assert_allclose(d.mean, [np.mean(train.column("f0")), np.mean(train.column("f1"))], rtol=1e-5)
    # the same files as other splits are other rows for the store: never the same soft-target key
    swapped = load_dataset("x", features=["f0", "f1"],
                           splits={**splits, "val": splits["test"], "test": splits["val"]})
    assert swapped.counts["test"] == 9 and swapped.fingerprint != d.fingerprint
    assert load_dataset("x", features=["f0", "f1"], splits=splits).fingerprint == d.fingerprint


def test_one_table_keeps_todays_fingerprint(tmp_path: Path) -> None:
    # pinned before data.splits existed: a single table cut by fractions keeps its soft-target keys
    assert load_dataset("sklearn:digits").fingerprint == "51e6ebd8879f52c1f3a80670cf8177432404a35a9478351b060103d3affcaa48"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"f0": rng.normal(size=30), "f1": rng.normal(size=30),
                             "label": rng.choice(["cat", "dog"], 30)}), tmp_path / "part-0.parquet")
    assert load_dataset(str(tmp_path), features=["f0", "f1"]).fingerprint == \
        "69185076d8bfb23c47cb988e9367c6569e543f33a8f55f8523dc20c75f969665"


@pytest.mark.parametrize("layout", ["{}.parquet", "{}/part-0.parquet", "data/{}-00000-of-00001.parquet",
                                    "{}-00000-of-00001.parquet"])
def test_a_folders_split_layout_is_found(tmp_path: Path, layout: str) -> None:
    write_splits(tmp_path / "ds", layout)
    d = load_dataset(str(tmp_path / "ds"), features=["f0", "f1"])
    assert d.counts == {"train": 40, "val": 9, "test": 11}


def test_without_a_val_split_val_rows_are_cut_from_train(tmp_path: Path) -> None:
    paths = write_splits(tmp_path)
    paths["validation"].unlink()
    d = load_dataset(str(tmp_path), features=["f0", "f1"], val=0.25)
    assert d.counts["test"] == 11 and d.counts["train"] + d.counts["val"] == 40 and 3 < d.counts["val"] < 18
    assert resolve(str(tmp_path), None, None).carves_val


def test_save_to_disk_folder_is_read_as_its_splits(tmp_path: Path) -> None:
    write_save_to_disk(tmp_path / "hf")
    d = load_dataset(str(tmp_path / "hf"), features=["f0", "f1"])
    assert d.counts == {"train": 40, "val": 9, "test": 11}  # "unsupervised" is no split kdflow knows
    assert set(d.source_rows) == {"train", "val", "test"}  # workers read the Arrow files, not the driver
    lazily = d.source_rows["test"].rows(0, 11)[0]
    np.testing.assert_array_equal(lazily, d.x["test"])
    parquet = tmp_path / "pq"
    write_splits(parquet)
    same = load_dataset(str(parquet), features=["f0", "f1"])
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(d.x[split], same.x[split], rtol=1e-6)
    one_split = load_dataset("x", features=["f0", "f1"], splits={"train": str(tmp_path / "hf" / "train"),
                                                                 "test": str(tmp_path / "hf" / "test")})
    assert one_split.counts["test"] == 11 and one_split.counts["train"] + one_split.counts["val"] == 40


def test_lm_documents_keep_their_given_splits(tmp_path: Path) -> None:
    write_save_to_disk(tmp_path / "hf")
    opts = {"source": str(tmp_path / "hf"), "seq_len": 8, "tokenizer": {"vocab_size": 270}}
    d = load_lm_data(CausalLMData(**opts), seed=0, storage=None)
    assert d.documents == {"train": 40, "val": 9, "test": 11}
    paths = write_splits(tmp_path / "pq")
    given = load_lm_data(CausalLMData(**{**opts, "splits": {"train": str(paths["train"]),
                                                            "test": str(paths["test"])}}), seed=0, storage=None)
    assert given.documents["test"] == 11 and given.documents["train"] + given.documents["val"] == 40


@pytest.mark.parametrize(("splits", "where", "message"), [
    ({"train": "DIR/train.parquet", "exam": "DIR/test.parquet"}, "splits.exam", "unknown split 'exam'"),
    ({"train": "DIR/train.parquet", "test": "DIR/nope.parquet"}, "splits.test", "no such file"),
    ({"train": "DIR/train.parquet", "val": "DIR/test.parquet"}, "splits", "no test split"),
    ({"train": "DIR/train.parquet", "test": "s3://bucket-x/test.parquet"}, "splits", "different filesystems"),
])
def test_bad_splits_name_the_key(tmp_path: Path, splits: dict, where: str, message: str) -> None:
    write_splits(tmp_path)
    splits = {k: v.replace("DIR", str(tmp_path)) for k, v in splits.items()}
    with pytest.raises(UserError) as err:
        load_dataset("x", features=["f0", "f1"], splits=splits)
    assert err.value.where == where and message in str(err.value)


def test_a_folder_without_a_layout_names_the_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no train/validation/test layout") as err:
        load_dataset(str(tmp_path / "empty"))
    assert err.value.where == "source"
    write_splits(tmp_path / "half")
    (tmp_path / "half" / "test.parquet").unlink()
    with pytest.raises(UserError, match="no test split") as err:
        load_dataset(str(tmp_path / "half"))
    assert err.value.where == "source"


def test_a_real_datasets_save_to_disk_folder_is_read_lazily_per_file(tmp_path: Path) -> None:
    """Written by Hugging Face `datasets` itself (a list column, a ClassLabel, text; two shards per split)."""
    from datasets import ClassLabel, DatasetDict, Features, Sequence, Value
    from datasets import Dataset as HFDataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    features = Features({"emb": Sequence(Value("float32")), "label": ClassLabel(names=["cat", "dog", "eel"]),
                         "text": Value("string")})
    rng = np.random.default_rng(0)
    x = {k: rng.normal(size=(n, 4)).astype(np.float32) for k, n in SIZES.items()}
    parts = {k: HFDataset.from_dict({"emb": x[k].tolist(), "label": rng.integers(0, 3, n).tolist(),
                                     "text": [f"{k} document {i}" for i in range(n)]}, features=features)
             for k, n in SIZES.items()}
    DatasetDict(parts).save_to_disk(str(tmp_path / "hf"), num_shards={k: 2 for k in SIZES})

    d = load_dataset(str(tmp_path / "hf"), features="emb")
    assert d.counts == {"train": 40, "val": 9, "test": 11} and d.num_features == 4 and d.classes == [0, 1, 2]
    pieces = d.source_rows["train"].pieces  # one per Arrow file, read when a reader asks
    assert [p.split for p in pieces] == ["train", "train", "val", "val", "test", "test"]
    np.testing.assert_allclose(d.x["test"], (x["test"] - d.mean) / d.std, rtol=1e-5, atol=1e-5)
    lm = load_lm_data(CausalLMData(source=str(tmp_path / "hf"), seq_len=8, tokenizer={"vocab_size": 270}), seed=0,
                      storage=None)
    assert lm.documents == {"train": 40, "val": 9, "test": 11}


def test_kdflow_validate_names_a_bad_data_splits_key() -> None:
    from orchestrator.spec import validate
    from tests.helpers import workflow

    for splits, says in (({"train": "a.parquet", "exam": "b.parquet"}, "data.splits: unknown split 'exam'"),
                         ({"train": "a.parquet"}, "data.splits: needs a test split")):
        with pytest.raises(UserError, match=says):
            validate(workflow(**{"data.splits": splits}))
    assert validate(workflow(**{"data.splits": {"training": "a", "validation": "b", "test": "c"}})).data.splits
