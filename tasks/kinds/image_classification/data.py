"""Image classification's data: images as users keep them, decoded with Pillow into uint8 rows, split,
fingerprinted, with the training split's per-channel statistics and, with `soft_targets.views`, every
training image's stored view parameters.

Sources: `sklearn:digits` (sklearn's 8x8 digits, written as PNG bytes in memory, so it takes the same
decoding path as a user's table); a Parquet file, folder or glob (local or s3://) with an image column (a
struct of `bytes` and `path`, as Hugging Face `datasets` and Ray Data write it, or a plain binary column of
PNG/JPEG bytes) and a label column; a folder tree `root/<class>/<file>` (ImageFolder). A row is its
channels x height x width pixels, flat, uint8; with views, a training row carries its V views' parameters
after the pixels (views.py), so the store keeps them beside the pixels and a worker replays them.
Errors name this module's own keys (`source`, `image`, `label`, `size`, `normalize`), which the driver
places under `data:`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.dataset import Dataset, list_parquet, read_table, sklearn_digits
from tasks.errors import UserError
from tasks.pieces import SPLIT_CODES, SPLIT_RULE, split_codes
from tasks.splits import Layout, resolve
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for

PREPROCESSING = "image-uint8-v1"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(kw_only=True)
class ImageTable(Dataset):
    """Rows of uint8 pixels [N, C*H*W] (training rows: + V*6 view parameters) and a class index each."""

    num_classes: int
    channels: int
    height: int
    width: int
    mean: list[float]  # per channel, 0-255 scale: the training split's, or given
    std: list[float]
    views: int = 0
    augment: dict[str, Any] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)  # the user's label values, by class index
    size_policy: dict[str, Any] = field(default_factory=dict)  # what a served model resizes to and how

    @property
    def num_features(self) -> int:
        return self.channels * self.height * self.width


@dataclass
class Raw:
    """A source's encoded images, their labels and each row's name for messages."""

    images: list[bytes]
    labels: list[Any]
    names: list[str]
    column: str  # the image column's key, for messages


# ---------------------------------------------------------------- sources


def _digits() -> Raw:
    from PIL import Image

    features, labels = sklearn_digits()
    out = []
    for img in features.reshape(-1, 8, 8):  # 0-16 -> 0-255 greys
        buf = io.BytesIO()
        Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return Raw(out, labels.tolist(), [f"row {i}" for i in range(len(out))], "image")


def _image_bytes(col: Any, column: str) -> list[bytes | None]:
    """A struct {bytes, path} or binary column's values as bytes (None where empty)."""
    import pyarrow as pa

    if pa.types.is_struct(col.type):
        if "bytes" not in [col.type.field(i).name for i in range(col.type.num_fields)]:
            raise UserError(f"the struct column has no 'bytes' field (fields: {[f.name for f in col.type]})",
                            where="image")
        col = col.field("bytes")
    elif not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise UserError(f"column {column!r} holds {col.type}, not image bytes (binary, or a struct of bytes and "
                        "path)", where="image")
    return col.to_pylist()


def _check_columns(names: list[str], image: str, label: str) -> None:
    for key, col in (("image", image), ("label", label)):
        if col not in names:
            raise UserError(f"column {col!r} not in the table (columns: {names})", where=key)


def _add_table(raw: Raw, table: Any, image: str, label: str, name: str) -> None:
    values = _image_bytes(table.column(image).combine_chunks(), image)
    raw.images += values
    raw.labels += table.column(label).to_pylist()
    raw.names += [f"{name} row {i}" for i in range(len(values))]


def _parquet(source: str, image: str, label: str, storage: Storage | None) -> Raw:
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = list_parquet(source, storage, "source")
    _check_columns(listed.schema.names, image, label)
    fs = filesystem_for(source, listed.s3_options)
    raw = Raw([], [], [], image)
    try:
        for path in dict.fromkeys(p.path for p in listed.pieces):
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=[image, label])
            _add_table(raw, table, image, label, next(p.name for p in listed.pieces if p.path == path))
    except (*S3_ERRORS, pa.ArrowException) as exc:
        raise UserError(f"cannot read Parquet from {source}: {describe_s3_error(exc)}", where="source") from None
    return raw


def _given(d: Any, storage: Storage | None, seed: int) -> tuple[Raw, np.ndarray | None, Layout | None]:
    """The images, and with splits as given (`data.splits`, a folder's layout: tasks/splits.py) each row's split
    code and the layout (None, None: one source, split by `data.split`'s fractions as before). A split is a
    Parquet source, a `save_to_disk` split (Arrow) or a folder tree `<split>/<class>/<file>`."""
    if d.source == "sklearn:digits" and not d.splits:
        return _read(d, storage), None, None
    layout = resolve(d.source, d.splits, storage, any_folder=True)
    if not layout.given:
        return _read(d, storage), None, None
    raw, codes = Raw([], [], [], d.image), []
    for k, src in layout.sources.items():
        if src.arrow_files:
            table = read_table(src, storage)
            _check_columns(table.column_names, d.image, d.label)
            part = Raw([], [], [], d.image)
            _add_table(part, table, d.image, d.label, k)
        else:
            part = _read(d.model_copy(update={"source": src.uri}), storage)
        n = min(len(part.images), d.limit or len(part.images))
        raw = Raw(raw.images + part.images[:n], raw.labels + part.labels[:n],
                  raw.names + [f"{k}/{name}" for name in part.names[:n]], part.column)
        codes.append(np.full(n, SPLIT_CODES[k], np.int8))
    code = np.concatenate(codes)
    if layout.carves_val:  # no val split given: its rows are cut from train's by the val fraction
        train = code == SPLIT_CODES["train"]
        code[train] = split_codes("train", 0, int(train.sum()), seed=seed, val=d.split.val, test=0.0)
    return raw, code, layout


def _folder(root: str) -> Raw:
    """root/<class>/<file>: the folder names are the labels."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    raw = Raw([], [], [], "source")
    for c in classes:
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                with open(os.path.join(root, c, f), "rb") as fh:
                    raw.images.append(fh.read())
                raw.labels.append(c)
                raw.names.append(f"{c}/{f}")
    if len({*raw.labels}) < 2:
        raise UserError(f"a folder tree needs a sub-folder of images per class, at least 2; {root} has "
                        f"{len({*raw.labels})} with images ({', '.join(classes) or 'none'})", where="source")
    return raw


def _read(d: Any, storage: Storage | None) -> Raw:
    src = d.source
    if src == "sklearn:digits":
        return _digits()
    local_dir = not src.startswith("s3://") and os.path.isdir(src)
    folder = d.layout == "folder" or (d.layout == "auto" and local_dir and not any(
        f.endswith(".parquet") for _, _, files in os.walk(src) for f in files))
    if folder:
        if not local_dir:
            raise UserError(f"a folder tree is a local folder; no such folder: {src}", where="source")
        return _folder(src)
    if src.endswith(".parquet") or local_dir or "/" in src or "*" in src:
        return _parquet(src, d.image, d.label, storage)
    raise UserError(f"unknown source {src!r}: sklearn:digits, a Parquet file/folder/glob (local or s3://) or a folder "
                    "tree root/<class>/<file>", where="source")


# ---------------------------------------------------------------- decoding


def _decode(raw: Raw) -> list[Any]:
    """Every image opened with Pillow; an undecodable one names the column and the row."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for i, b in enumerate(raw.images):
        try:
            if b is None:
                raise ValueError("empty value")
            img = Image.open(io.BytesIO(b))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            if raw.column == "source":  # a folder tree: the file is the row
                raise UserError(f"{raw.names[i]} (row id {i}) is not a decodable image: {exc}", where="source") from None
            raise UserError(f"column {raw.column!r}, row id {i} ({raw.names[i]}): not a decodable image: {exc}",
                            where="image") from None
        out.append(img)
    return out


def _target_size(images: list[Any], d: Any) -> tuple[int, int]:
    if d.size is not None:
        return (d.size, d.size) if isinstance(d.size, int) else (int(d.size[0]), int(d.size[1]))
    sizes = sorted({(im.height, im.width) for im in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
        raise UserError(f"the images have {len(sizes)} sizes ({shown}); set data.size: [height, width] (and "
                        "data.resize: stretch | crop) to resize them", where="size")
    return sizes[0]


def to_pixels(img: Any, channels: int, hw: tuple[int, int], policy: str) -> np.ndarray:
    """One Pillow image as uint8 [C, H, W]: converted to `channels`, resized (stretch, or scale the shorter
    side and center-crop). The served model calls this too, so it prepares images as training did."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    h, w = hw
    if (img.height, img.width) != (h, w):
        if policy == "crop":
            s = max(h / img.height, w / img.width)
            img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BILINEAR)
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        else:
            img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _pixels(raw: Raw, d: Any) -> tuple[np.ndarray, int, tuple[int, int]]:
    images = _decode(raw)
    if not images:
        raise UserError("the source holds no images", where="source")
    channels = d.channels or (1 if all(im.mode in GREY_MODES for im in images) else 3)
    hw = _target_size(images, d)
    x = np.stack([to_pixels(im, channels, hw, d.resize).reshape(-1) for im in images])
    return x, channels, hw


# ---------------------------------------------------------------- the table


def _stats(x: np.ndarray, channels: int, d: Any) -> tuple[list[float], list[float]]:
    if d.normalize is not None:
        if len(d.normalize.mean) != channels:
            raise UserError(f"{len(d.normalize.mean)} values for {channels}-channel images", where="normalize")
        return list(d.normalize.mean), list(d.normalize.std)
    per = x.reshape(len(x), channels, -1).astype(np.float64)
    mean = per.mean(axis=(0, 2))
    std = per.std(axis=(0, 2))
    return [float(m) for m in mean], [float(s) if s > 1e-3 else 1.0 for s in std]


def _classes(labels: list[Any]) -> tuple[list[Any], np.ndarray]:
    if any(v is None for v in labels):
        raise UserError(f"row id {labels.index(None)} has no label", where="label")
    classes = sorted({*labels}, key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise UserError(f"need at least 2 classes, found {len(classes)}", where="label")
    index = {c: i for i, c in enumerate(classes)}
    return [c.item() if hasattr(c, "item") else c for c in classes], np.array([index[v] for v in labels], np.int64)


def load_images(d: Any, *, seed: int, views: int = 0, augment: dict[str, Any] | None = None,
                augment_spec: Any = None, storage: Storage | None = None) -> ImageTable:
    """Read, decode, split (a hash of seed and row id, as every kind) and describe the images of data section
    `d`; with `views`, draw every training image's views (`augment_spec`, its keys `augment`)."""
    raw, given, layout = _given(d, storage, seed)
    if d.limit and given is None:
        raw = Raw(raw.images[:d.limit], raw.labels[:d.limit], raw.names[:d.limit], raw.column)
    x, channels, (h, w) = _pixels(raw, d)
    classes, y = _classes(raw.labels)
    codes = split_codes("", 0, len(y), seed=seed, val=d.split.val, test=d.split.test) if given is None else given
    ids = {k: np.flatnonzero(codes == c) for k, c in SPLIT_CODES.items()}
    if len(ids["train"]) < 2 or len(ids["test"]) < 1:
        raise UserError(f"{len(y)} images are too few for this split", where="split")
    mean, std = _stats(x[ids["train"]], channels, d)
    xs = {k: x[i] for k, i in ids.items()}
    if views:
        from tasks.kinds.image_classification.views import draw_views

        params = draw_views(ids["train"], views, augment_spec, seed).reshape(len(ids["train"]), -1)
        xs["train"] = np.concatenate([xs["train"], params.astype(np.uint8)], axis=1)
    policy = {"size": [h, w], "resize": d.resize, "channels": channels}
    h_all = hashlib.sha256()
    h_all.update(f"{PREPROCESSING}|{SPLIT_RULE}|seed={seed}|val={d.split.val}|test={d.split.test}|"
                 f"{json.dumps(policy)}|{json.dumps([mean, std])}|{json.dumps(classes, default=str)}|".encode())
    h_all.update(np.ascontiguousarray(x).tobytes())
    h_all.update(y.tobytes())
    if layout is not None:  # splits as given: which split each row is in (one table's keys stay as they were)
        h_all.update(f"{layout.identity()}".encode() + codes.tobytes())
    labeled = h_all.hexdigest()
    h_all.update(f"views={views}|{json.dumps(augment or {}, sort_keys=True)}".encode())
    return ImageTable(num_classes=len(classes), channels=channels, height=h, width=w, mean=mean, std=std,
                      views=views, augment=dict(augment or {}), classes=classes, size_policy=policy,
                      fingerprint=h_all.hexdigest() if views else labeled, labeled_fingerprint=labeled,
                      arrays=(xs, {k: y[i] for k, i in ids.items()}),
                      sources={k: (layout.sources.get(k) or layout.sources["train"]).uri if layout else d.source
                               for k in ids},
                      columns=_columns(raw, d))


def _columns(raw: Raw, d: Any) -> dict[str, str]:
    """The columns read, as MLflow names their types (the run's lineage); a folder tree has none."""
    if raw.column == "source":
        return {}
    return {raw.column: "binary", d.label: "string" if any(isinstance(v, str) for v in raw.labels[:1]) else "long"}
