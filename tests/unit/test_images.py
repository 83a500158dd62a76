"""task image_classification without Ray: image tables read and decoded (Parquet struct and binary columns,
folder trees), bad input named, the view draw and its replay bit-identical to what the teacher saw, the
model families and the stored targets per view."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.errors import UserError
from tasks.kinds.image_classification.data import load_images
from tasks.kinds.image_classification.spec import AugmentSpec, ImageData
from tasks.kinds.image_classification.views import IDENTITY, PARAMS, apply_views, draw_views


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def digits(n: int = 120) -> tuple[list[bytes], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return [png(np.round(img * 255 / 16)) for img in d.images[:n]], d.target[:n]


def write_table(path: Path, images: list[bytes | None], labels: list, struct: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]) if struct \
        else pa.array(images, type=pa.binary())
    pq.write_table(pa.table({"img": col, "digit": labels}), path)
    return path


def data(source: str, **keys) -> ImageData:
    return ImageData(source=source, image=keys.pop("image", "img"), label=keys.pop("label", "digit"), **keys)


@pytest.mark.parametrize("struct", [True, False])
def test_a_parquet_image_column_is_decoded_split_and_described(tmp_path: Path, struct: bool) -> None:
    images, labels = digits()
    path = write_table(tmp_path / "d.parquet", images, [f"d{v}" for v in labels], struct)
    t = load_images(data(str(path)), seed=0)
    assert (t.channels, t.height, t.width, t.num_classes) == (1, 8, 8, 10)
    assert t.classes == sorted({f"d{v}" for v in labels})
    assert sum(t.counts.values()) == 120 and t.x["train"].dtype == np.uint8 and t.x["train"].shape[1] == 64
    assert 0 < t.mean[0] < 255 and t.std[0] > 1
    # the same images as a struct or a binary column are the same rows: the same fingerprint
    other = write_table(tmp_path / "o.parquet", images, [f"d{v}" for v in labels], not struct)
    assert load_images(data(str(other)), seed=0).fingerprint == t.fingerprint


def test_views_are_drawn_into_the_training_rows_only_and_change_the_fingerprint_not_the_teachers(
        tmp_path: Path) -> None:
    images, labels = digits()
    path = write_table(tmp_path / "d.parquet", images, labels.tolist(), True)
    plain = load_images(data(str(path)), seed=0)
    aug = AugmentSpec(hflip=False)
    viewed = load_images(data(str(path)), seed=0, views=3, augment=aug.model_dump(), augment_spec=aug)
    assert viewed.x["train"].shape[1] == 64 + 3 * PARAMS and viewed.x["val"].shape[1] == 64
    assert np.array_equal(viewed.x["train"][:, :64], plain.x["train"])
    assert viewed.fingerprint != plain.fingerprint and viewed.labeled_fingerprint == plain.labeled_fingerprint


def test_a_folder_tree_is_a_source_and_one_class_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "tree" / c / f"{i}.png").write_bytes(png(rng.integers(0, 255, (10, 12, 3))))
    t = load_images(data(str(tmp_path / "tree")), seed=0)
    assert (t.channels, t.height, t.width, t.classes) == (3, 10, 12, ["cat", "dog"])
    (tmp_path / "one" / "cat").mkdir(parents=True)
    (tmp_path / "one" / "cat" / "a.png").write_bytes(png(rng.integers(0, 255, (4, 4))))
    with pytest.raises(UserError) as err:
        load_images(data(str(tmp_path / "one")), seed=0)
    assert err.value.where == "source" and "at least 2" in err.value.message


def test_bad_images_and_columns_are_named(tmp_path: Path) -> None:
    images, labels = digits(30)
    broken = write_table(tmp_path / "b.parquet", images[:7] + [b"not an image"] + images[8:], labels.tolist(), False)
    with pytest.raises(UserError) as err:
        load_images(data(str(broken)), seed=0)
    assert err.value.where == "image" and "'img'" in err.value.message and "row id 7" in err.value.message
    with pytest.raises(UserError) as err:
        load_images(data(str(broken), image="picture"), seed=0)
    assert err.value.where == "image" and "'picture'" in err.value.message
    big = png(np.zeros((16, 16)))
    mixed = write_table(tmp_path / "m.parquet", images[:29] + [big], labels.tolist(), False)
    with pytest.raises(UserError) as err:
        load_images(data(str(mixed)), seed=0)
    assert err.value.where == "size" and "8x8" in err.value.message and "16x16" in err.value.message
    t = load_images(data(str(mixed), size=8), seed=0)  # a resize policy takes them
    assert (t.height, t.width) == (8, 8)


def test_the_identity_view_is_the_image_and_a_flip_mirrors_it() -> None:
    img = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    same = apply_views(img, torch.tensor([IDENTITY] * 2))
    assert torch.allclose(same, img, atol=1e-3)
    flipped = apply_views(img, torch.tensor([[127, 127, 254, 254, 1, 128]] * 2))
    assert torch.allclose(flipped, img.flip(-1), atol=1e-3)


def test_view_draws_are_a_function_of_seed_and_row_and_stay_in_range() -> None:
    aug = AugmentSpec(crop_scale=[0.35, 1.0], hflip=True, rotate=10)
    a = draw_views(np.array([3, 9, 11]), 8, aug, seed=1)
    assert np.array_equal(a[1], draw_views(np.array([9]), 8, aug, seed=1)[0])
    assert not np.array_equal(a, draw_views(np.array([3, 9, 11]), 8, aug, seed=2))
    assert a.min() >= 0 and a.max() <= 255 and set(np.unique(a[..., 4])) <= {0, 1}
    assert np.all(np.abs(a[..., 5] - 128) <= 20)  # +-10 degrees in half degrees
    area = (a[..., 2] / 254.0) * (a[..., 3] / 254.0)
    assert area.min() > 0.3 and area.max() <= 1.0
    assert not draw_views(np.arange(5), 4, AugmentSpec(hflip=False), 0)[..., 4].any()


class Recording(torch.nn.Module):
    """An image teacher that keeps every batch of views it is shown."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.image_shape, self.seen = model, model.image_shape, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.model(x)


def test_a_replayed_view_is_bit_identical_to_the_one_the_teacher_labelled() -> None:
    from tasks.kinds.image_classification.models import build_model
    from tasks.kinds.image_classification.targets import FORWARD_IMAGES, place_share, teacher_outputs
    from tasks.store.shards import TargetBatch, decode_rows, encode_rows

    dims = {"channels": 3, "height": 12, "width": 10, "num_classes": 5, "mean": [100.0] * 3, "std": [50.0] * 3}
    rng = np.random.default_rng(0)
    n, v = 40, 4
    pixels = rng.integers(0, 256, (n, 3 * 12 * 10)).astype(np.uint8)
    params = draw_views(np.arange(n), v, AugmentSpec(rotate=15), seed=0).reshape(n, -1).astype(np.uint8)
    x = np.concatenate([pixels, params], axis=1)
    torch.manual_seed(0)
    teacher = Recording(build_model("cnn", {"channels": [4]}, dims).eval())
    logits = teacher_outputs([teacher], x, "mean_probs")
    assert logits.shape == (n, v, 5) and FORWARD_IMAGES >= n * v
    seen = torch.cat(teacher.seen).view(n, v, 3, 12, 10)
    # through the store (top-5 of 5 classes: exact up to fp16), then a worker's share replays one view per image
    stored = decode_rows(encode_rows(np.arange(n), x, np.zeros(n, np.int64), logits, "logits", "float32", None),
                         "float32")
    share = place_share(TargetBatch(stored.row_id, stored.x, stored.y, stored.targets), dims, torch.device("cpu"))
    for idx in (torch.tensor([5, 0, 39, 17]), torch.arange(n)):
        state = share.gen.get_state()
        xb, _, tb = share.batch(idx)
        share.gen.set_state(state)
        which = share.pick(idx)  # the views batch() drew
        assert torch.equal(xb, seen[idx, which]), "the replayed view differs from the teacher's"
        assert torch.equal(tb, logits[idx, which])


def test_the_online_teacher_labels_exactly_the_fresh_view_the_student_gets() -> None:
    """soft_targets.mode: online: each batch draws a fresh view per image (the stored views' draw, `apply_views`),
    and the teacher's logits are its output on those very pixels, without autograd; a new epoch, new views."""
    from tasks.kinds import kind_for
    from tasks.kinds.image_classification.models import build_model
    from tasks.store.shards import TargetBatch

    kind = kind_for("image_classification")
    dims = {"channels": 1, "height": 8, "width": 8, "num_classes": 4, "mean": [100.0], "std": [50.0],
            "augment": {"crop_scale": [0.3, 0.6], "hflip": True, "rotate": 10.0}}
    n = 24
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 64)).astype(np.uint8))
    rows = TargetBatch(torch.arange(n), pixels, torch.arange(n) % 4, {})
    torch.manual_seed(0)
    teacher = Recording(build_model("cnn", {"channels": [4]}, dims).eval())
    share = kind.with_teacher(kind.place(rows, dims, torch.device("cpu")), [teacher], "mean_logits", dims)
    idx = torch.tensor([3, 0, 23, 7, 7])
    xb, yb, tb = share.batch(idx)
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], xb), "the teacher saw other pixels"
    with torch.no_grad():
        assert torch.equal(tb, teacher.model(xb).float())
    assert not tb.requires_grad and torch.equal(yb, idx % 4) and len(share) == n
    whole = pixels[idx].view(-1, 1, 8, 8).float()
    assert not torch.equal(xb, whole), "an augmented view, not the stored image"
    again, _, _ = share.batch(idx)
    assert not torch.equal(again, xb), "a fresh view each time an image comes up"


def test_model_families_take_depth_and_width_and_say_what_they_do_not() -> None:
    from tasks.kinds.image_classification.models import build_model, unknown_param
    from tasks.models import num_params

    dims = {"channels": 1, "height": 8, "width": 8, "num_classes": 10, "mean": [0.0], "std": [1.0]}
    small = build_model("resnet", {"depth": 8, "width": 8}, dims)
    assert num_params(build_model("resnet", {"depth": 14, "width": 8}, dims)) > num_params(small)
    assert small(torch.zeros(3, 64, dtype=torch.uint8)).shape == (3, 10)  # flat stored rows
    with pytest.raises(UserError, match="6n \\+ 2"):
        build_model("resnet", {"depth": 9}, dims)
    assert unknown_param("resnet", "depth") is None and "hidden" in (unknown_param("resnet", "hidden") or "")
    assert unknown_param("pkg.mod:fn", "anything") is None
    assert build_model("cnn", {"width": 4, "depth": 3}, dims)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_the_kind_is_listed_and_its_workflow_validates() -> None:
    from orchestrator.spec import validate
    from tasks.kinds import kind_for

    kind = kind_for("image_classification")
    wf = validate({"name": "w", "task": "image_classification",
                                  "soft_targets": {"views": 4, "format": "topk", "top_k": 5,
                                                   "augment": {"hflip": False}}})
    assert wf.kind is kind and wf.soft_targets.views == 4 and wf.teacher.model == "resnet"
    summary = kind.targets_summary({"views": 4, "dtype": "float16", "format": "topk", "top_k": 5,
                                    "num_classes": 10})
    assert summary["bytes_per_view"] <= 40
    online = validate({"name": "w", "task": "image_classification", "soft_targets": {"mode": "online"}})
    assert kind.teacher_in_loop(online) and not kind.teacher_in_loop(wf)
    with pytest.raises(UserError) as err:  # stored views mean nothing to an online teacher
        validate({"name": "w", "task": "image_classification", "soft_targets": {"mode": "online", "views": 4}})
    assert "soft_targets.views" in str(err.value)
    with pytest.raises(UserError) as err:
        validate({"name": "w", "task": "image_classification",
                  "search": {"trials": 2, "space": {"soft_targets.views": {"type": "categorical", "choices": [2, 4]}}}})
    assert "search.space.soft_targets.views" in str(err.value)
    searched = validate({"name": "w", "task": "image_classification",
                         "search": {"trials": 2, "space": {"student.params.width": {"type": "int", "low": 4, "high": 16},
                                                           "student.params.depth": {"type": "categorical",
                                                                                    "choices": [8, 14]}},
                                    }, "student": {"model": "resnet"}})
    assert set(searched.search.space) == {"student.params.width", "student.params.depth"}


def test_views_are_stored_top_k_per_view_with_one_label_per_image() -> None:
    """A training row's targets [V, C] go through the store's per-position path with one label for the row."""
    from tasks.kinds.image_classification.targets import per_view_logits
    from tasks.store.shards import decode_rows, encode_rows

    n, v, c = 6, 3, 10
    logits = torch.randn(n, v, c)
    x = np.zeros((n, 64 + v * PARAMS), np.uint8)
    y = np.array([0, 1, 2, 3, 4, -1])  # a label -1 masks nothing here: it is one label for all the row's views
    rows = decode_rows(encode_rows(np.arange(n), x, y, logits, "topk", "float32", c), "float32")
    assert rows.targets["topk_values"].shape == (n, v * c) and rows.targets["tail_logmass"].shape == (n, v)
    dense = per_view_logits(rows.targets, v, c)
    assert torch.allclose(torch.log_softmax(dense, -1), torch.log_softmax(logits, -1), atol=1e-5)


def test_a_teacher_whose_channels_are_not_the_datas_is_refused_naming_its_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tasks.kinds.image_classification import serving, teachers
    from tasks.kinds.image_classification.models import build_model

    rgb = {"channels": 3, "height": 8, "width": 8, "num_classes": 10, "mean": [0.0] * 3, "std": [1.0] * 3}
    grey = {**rgb, "channels": 1, "mean": [0.0], "std": [1.0]}
    torch.save(build_model("cnn", {"channels": [4]}, rgb).net.state_dict(), tmp_path / "rgb.pt")
    spec = SimpleNamespace(model="cnn", params={"channels": [4]}, checkpoint=str(tmp_path / "rgb.pt"))
    with pytest.raises(UserError) as err:
        teachers.load_teacher(spec, grey)
    assert err.value.where == "checkpoint" and "1-channel" in err.value.message
    assert teachers.load_teacher(spec, rgb).image_shape == (3, 8, 8)  # the same file fits RGB images

    monkeypatch.setattr(serving, "load_registered", lambda uri: (None, {"dims": rgb}))
    with pytest.raises(UserError) as err:
        teachers.load_teacher(SimpleNamespace(model="models:/t@champion", params={}, checkpoint=None), grey)
    assert err.value.where == "model" and "3-channel" in err.value.message and "have 1" in err.value.message


def test_images_keep_their_given_splits_from_folders_tables_and_save_to_disk(tmp_path: Path) -> None:
    import json

    import pyarrow as pa

    images, labels = digits(60)
    # root/<split>/<class>/<file>: a folder tree per split, found as the folder's layout
    for split, rows in (("train", range(40)), ("test", range(40, 60))):
        for i in rows:
            (tmp_path / "tree" / split / f"d{labels[i]}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "tree" / split / f"d{labels[i]}" / f"{i}.png").write_bytes(images[i])
    t = load_images(data(str(tmp_path / "tree")), seed=0)
    assert t.counts["test"] == 20 and t.counts["train"] + t.counts["val"] == 40 and t.counts["val"] > 0
    # a Parquet split and a save_to_disk split (an Arrow stream, the image as a struct of bytes and path)
    write_table(tmp_path / "train.parquet", images[:40], [f"d{v}" for v in labels[:40]], True)
    (tmp_path / "hf" / "test").mkdir(parents=True)
    table = pa.table({"img": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images[40:])]),
                      "digit": [f"d{v}" for v in labels[40:]]})
    with pa.OSFile(str(tmp_path / "hf" / "test" / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=7)
    (tmp_path / "hf" / "test" / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    given = load_images(data("x", splits={"train": str(tmp_path / "train.parquet"),
                                          "test": str(tmp_path / "hf" / "test")}), seed=0)
    assert given.counts["test"] == 20 and given.classes == t.classes
    np.testing.assert_array_equal(np.sort(given.x["test"], axis=0), np.sort(t.x["test"], axis=0))
    assert given.fingerprint != load_images(data(str(tmp_path / "train.parquet")), seed=0).fingerprint
