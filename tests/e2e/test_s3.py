"""S3 through a real S3 API server on loopback (moto's server mode): the same code path as a local folder.

The round trip is one real `kdflow run` of workflows/parquet-s3.yaml: the user's Parquet dataset is read
from s3://, the teacher, checkpoints and soft targets are written there, and the student reads its shards
back from there inside a Ray Train worker.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tasks.errors import UserError
from tasks.kinds.classification.data import load_dataset
from tasks.storage import Storage
from tasks.store.store import SPLITS, SoftTargetStore
from tests.conftest import REPO, kdflow

EXAMPLE = REPO / "workflows" / "parquet-s3.yaml"


def fs(server: dict[str, str]) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=server["endpoint"], skip_instance_cache=True, use_listings_cache=False)


def digits_table() -> pa.Table:
    from sklearn.datasets import load_digits

    d = load_digits()
    return pa.table({**{f"p{i}": d.data[:, i].astype(np.float32) for i in range(64)},
                     "label": [f"digit-{v}" for v in d.target]})


def upload_parquet(s3: s3fs.S3FileSystem, table: pa.Table, path: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.pipe_file(path, buf.getvalue())


def assert_user_error(proc: Any, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_parquet_on_s3_round_trip_through_kdflow_run(s3_server: dict[str, str], s3_bucket: str,
                                                     workdir: Path) -> None:
    s3 = fs(s3_server)
    table = digits_table()
    upload_parquet(s3, table.slice(0, 1000), f"{s3_bucket}/datasets/digits/part-0.parquet")
    upload_parquet(s3, table.slice(1000), f"{s3_bucket}/datasets/digits/part-1.parquet")
    root = f"s3://{s3_bucket}/runs"

    proc = kdflow("run", str(EXAMPLE), "--json", "--set", f"storage.root={root}",
                  "--set", f"data.source=s3://{s3_bucket}/datasets/digits/*.parquet",
                  "--set", "teacher.train.epochs=3", "--set", "train.epochs=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout)
    st = result["soft_targets"]
    assert result["status"] == "succeeded" and st["uri"] == f"{root}/soft_targets/{st['cache_key']}"
    assert st["rows"] == 1797 and st["format"] == "topk" and result["student"]["test_accuracy"] > 0.3
    assert not (workdir / ".kdflow" / "soft_targets").exists()  # nothing of the store landed locally

    store = SoftTargetStore(Storage(root))
    m = store.require(st["cache_key"])
    for split in SPLITS:
        for shard in m["splits"][split]["shards"]:
            assert s3.size(f"{s3_bucket}/runs/soft_targets/{m['key']}/{shard['path']}") == shard["bytes"]
    ids = np.concatenate([store.read(m, s).row_id.numpy() for s in SPLITS])
    np.testing.assert_array_equal(ids, np.arange(1797))
    assert m["num_classes"] == 10 and m["num_features"] == 64
    assert s3.ls(f"{s3_bucket}/runs/teachers") and s3.ls(f"{s3_bucket}/runs/checkpoints")

    listed = kdflow("cache", "list", "--json", "--root", root, cwd=workdir)
    assert [(e["key"], e["complete"]) for e in json.loads(listed.stdout)] == [(m["key"], True)]

    # a corrupted object on S3 is named, and left where it is
    shard = f"{s3_bucket}/runs/soft_targets/{m['key']}/{m['splits']['test']['shards'][0]['path']}"
    data = bytearray(s3.cat_file(shard))
    data[-100] ^= 0xFF
    s3.pipe_file(shard, bytes(data))
    assert_user_error(kdflow("cache", "verify", m["key"], "--root", root, cwd=workdir),
                      f"s3://{shard}: checksum mismatch")
    assert s3.cat_file(shard) == bytes(data) and s3.exists(f"{s3_bucket}/runs/soft_targets/{m['key']}/manifest.json")


def test_missing_bucket_exits_2_naming_it(s3_server: dict[str, str], s3_bucket: str, workdir: Path) -> None:
    proc = kdflow("run", str(EXAMPLE), "--set", "storage.root=s3://no-such-bucket-kdflow/runs", cwd=workdir)
    assert_user_error(proc, "storage.root: bucket 'no-such-bucket-kdflow' does not exist")
    proc = kdflow("cache", "list", "--root", "s3://no-such-bucket-kdflow/runs", cwd=workdir)
    assert_user_error(proc, "bucket 'no-such-bucket-kdflow' does not exist")


def test_missing_data_bucket_is_named(s3_server: dict[str, str], s3_bucket: str) -> None:
    with pytest.raises(UserError, match="bucket 'no-such-data-bucket' does not exist") as err:
        load_dataset("s3://no-such-data-bucket/digits/*.parquet", storage=Storage(f"s3://{s3_bucket}/runs"))
    assert err.value.where == "source"
    with pytest.raises(UserError, match="no files match") as err:
        load_dataset(f"s3://{s3_bucket}/none/*.parquet")
    assert err.value.where == "source"
    upload_parquet(fs(s3_server), digits_table(), f"{s3_bucket}/d.parquet")
    with pytest.raises(UserError, match="bucket 'no-such-data-bucket' does not exist") as err:
        load_dataset(f"s3://{s3_bucket}/d.parquet", transfer="s3://no-such-data-bucket/u.parquet")
    assert err.value.where == "transfer"


def test_missing_credentials_exit_2_and_delete_nothing(s3_server: dict[str, str], s3_bucket: str, workdir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = fs(s3_server)
    s3.pipe_file(f"{s3_bucket}/runs/soft_targets/abc/manifest.json", b"{}")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    proc = kdflow("run", str(EXAMPLE), "--set", f"storage.root=s3://{s3_bucket}/runs", cwd=workdir)
    assert_user_error(proc, f"storage.root: cannot reach bucket '{s3_bucket}': no AWS credentials")
    assert_user_error(kdflow("cache", "rm", "abc", "--root", f"s3://{s3_bucket}/runs", cwd=workdir),
                      "no AWS credentials")
    assert s3.exists(f"{s3_bucket}/runs/soft_targets/abc/manifest.json")


def test_storage_on_s3_reads_its_own_writes_and_pins_the_endpoint(s3_server: dict[str, str], s3_bucket: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a = Storage(f"s3://{s3_bucket}/root")
    b = Storage(f"s3://{s3_bucket}/root")
    a.write_bytes(a.path("x", "one.bin"), b"1" * 10)
    assert a.ls(a.path("x")) == [a.path("x", "one.bin")]
    b.write_bytes(b.path("x", "two.bin"), b"22")  # another process (a Ray worker) adds an object...
    assert a.exists(a.path("x", "two.bin")) and a.size(a.path("x", "two.bin")) == 2  # ...seen at once
    assert a.read_bytes(a.path("x", "two.bin")) == b"22"
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/root/x/three.bin: no such object"):
        a.read_bytes(a.path("x", "three.bin"))
    a.rm(a.path("x"))
    assert not b.exists(b.path("x", "one.bin"))

    # a worker whose environment lacks AWS_ENDPOINT_URL still talks to the driver's server
    shipped = pickle.dumps(a)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    worker_side = pickle.loads(shipped)
    assert worker_side.s3_options()["endpoint_url"] == s3_server["endpoint"]
    worker_side.write_bytes(worker_side.path("y.bin"), b"ok")
    assert fs(s3_server).cat_file(f"{s3_bucket}/root/y.bin") == b"ok"


def test_parquet_on_s3_loads_exactly_like_the_same_files_on_disk(s3_server: dict[str, str], s3_bucket: str,
                                                               tmp_path: Path) -> None:
    s3 = fs(s3_server)
    table = digits_table()
    for i, part in enumerate((table.slice(0, 900), table.slice(900))):
        upload_parquet(s3, part, f"{s3_bucket}/d/part-{i}.parquet")
        pq.write_table(part, tmp_path / f"part-{i}.parquet")
    unlabeled = table.drop_columns(["label"]).slice(0, 200)
    upload_parquet(s3, unlabeled, f"{s3_bucket}/u/rows.parquet")
    pq.write_table(unlabeled, tmp_path / "rows.parquet")

    remote = load_dataset(f"s3://{s3_bucket}/d/*.parquet", transfer=f"s3://{s3_bucket}/u/rows.parquet",
                          storage=Storage(f"s3://{s3_bucket}/runs"))
    local = load_dataset(str(tmp_path / "part-*.parquet"), transfer=str(tmp_path / "rows.parquet"))
    assert remote.fingerprint == local.fingerprint and remote.rows("transfer") == 200
    assert remote.classes == [f"digit-{i}" for i in range(10)]


def test_split_layouts_on_s3_read_like_the_same_folders_on_disk(s3_server: dict[str, str], s3_bucket: str,
                                                                 tmp_path: Path) -> None:
    """data.splits with s3:// sources, a folder layout found on S3, and a save_to_disk folder uploaded to S3."""
    from tests.unit.test_splits import write_save_to_disk, write_splits

    s3 = fs(s3_server)
    write_splits(tmp_path / "files")
    write_save_to_disk(tmp_path / "hf")
    s3.put(str(tmp_path / "files"), f"{s3_bucket}/files", recursive=True)
    s3.put(str(tmp_path / "hf"), f"{s3_bucket}/hf", recursive=True)
    storage = Storage(f"s3://{s3_bucket}/runs")
    local = load_dataset(str(tmp_path / "files"), features=["f0", "f1"])
    for source in (f"s3://{s3_bucket}/files", f"s3://{s3_bucket}/hf"):
        remote = load_dataset(source, features=["f0", "f1"], storage=storage)
        assert remote.counts == {"train": 40, "val": 9, "test": 11}
        np.testing.assert_allclose(remote.source_rows["test"].rows(0, 11)[0], local.x["test"], rtol=1e-6)
    given = load_dataset("x", features=["f0", "f1"], storage=storage, splits={
        "train": f"s3://{s3_bucket}/files/train.parquet", "validation": f"s3://{s3_bucket}/hf/validation",
        "test": f"s3://{s3_bucket}/files/test.parquet"})
    assert given.counts == {"train": 40, "val": 9, "test": 11}
