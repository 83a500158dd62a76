"""Where each split's rows come from: `data.splits` as given, a folder's own layout, or one table cut by fractions.

Kind-agnostic: a kind asks `resolve` for its data section's `Layout` and reads the rows of each split source it
names (tasks/dataset.py lists a source's pieces, Parquet or Arrow); only a single table (`Layout.given` false)
is cut by `data.split`'s fractions. The layouts found in a folder given as `data.source`, in this order:

- a Hugging Face `datasets` `save_to_disk` folder: `dataset_dict.json` and a folder per split, each with its
  `state.json` and `data-*.arrow` files (Arrow IPC streams); one split's folder (`state.json` at the top) is
  a single table;
- Hugging Face's Parquet layout: `data/<split>-*.parquet` (or `<split>-*.parquet` at the top);
- `train`/`validation` (or `val`)/`test` Parquet files (`train.parquet`) or subfolders (`train/`).

A folder with none of these and some Parquet files is a single table (as before); with neither, exit 2.
Split names as datasets spell them map to kdflow's: training -> train, validation/valid/dev -> val,
testing -> test; a discovered split of another name (imdb's `unsupervised`) is left out. `train` and `test`
are needed; without a val split, the val rows are cut from the training split by `data.split.val`
(`CARVE_VAL`). The test split is only ever reported on, never used to select or stop.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import UserError
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for

SPLITS = ("train", "val", "test")
NAMES = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
         "test": "test", "testing": "test"}
# a piece of the training split whose val rows are cut from it by the val fraction (no val split was given)
CARVE_VAL = "train+val"
SAVE_TO_DISK = "save_to_disk"


@dataclass(frozen=True)
class SplitSource:
    """One split's rows: a Parquet file, folder or glob or a JSON-lines file (local or s3://), or the Arrow
    files of a `save_to_disk` split folder (`arrow_files`, full paths)."""

    split: str  # train | val | test ("" for a single table)
    uri: str
    arrow_files: tuple[str, ...] = ()
    where: str = "source"  # the data key its errors name: source, or splits.<name>


@dataclass(frozen=True)
class Layout:
    """How a data section's rows are split: `sources` by split (given or discovered), or one `table`."""

    name: str  # fractions | splits | save_to_disk | hf-parquet | files
    sources: dict[str, SplitSource] = field(default_factory=dict)
    table: SplitSource | None = None

    @property
    def given(self) -> bool:
        return bool(self.sources)

    @property
    def carves_val(self) -> bool:
        return self.given and "val" not in self.sources

    def identity(self) -> str:
        """What the fingerprint adds for given splits (nothing for one table, so today's keys stay): the
        splits by name, never by path, so a moved folder keeps its keys."""
        if not self.given:
            return ""
        return f"splits={','.join(sorted(self.sources))}|carve_val={self.carves_val}|"


def split_name(name: str, where: str) -> str:
    """kdflow's name of a split named as datasets name them; unknown names exit 2 naming `where`."""
    if name not in NAMES:
        raise UserError(f"unknown split {name!r}: use train, val (or validation) and test", where=where)
    return NAMES[name]


def resolve(source: str, splits: dict[str, str] | None, storage: Storage | None, *,
            any_folder: bool = False) -> Layout:
    """The layout of a data section: its `splits` as given, else `source`'s folder layout, else one table.
    `any_folder`: a folder with no layout and no Parquet files is one table too (a kind that reads folders
    of its own, such as a tree of images), not an error."""
    opts = storage.s3_options() if storage is not None else {}
    if splits:
        if len({uri.startswith("s3://") for uri in splits.values()}) > 1:
            raise UserError("the splits are on different filesystems (local and s3://); keep them together",
                            where="splits")
        given = {}
        for name, uri in splits.items():
            k = split_name(name, f"splits.{name}")
            if k in given:
                raise UserError(f"the {k} split is given twice", where=f"splits.{name}")
            given[k] = _split_source(k, uri, opts, f"splits.{name}")
        return _complete(Layout("splits", given), "splits")
    if not _is_folder(source, opts):
        return Layout("fractions", table=SplitSource("", source))
    return _discover(source, opts, any_folder)


def _complete(layout: Layout, where: str) -> Layout:
    missing = [k for k in ("train", "test") if k not in layout.sources]
    if missing:
        raise UserError(f"no {' or '.join(missing)} split (found: {', '.join(sorted(layout.sources)) or 'none'})",
                        where=where)
    return layout


def _path(uri: str) -> str:
    return uri.removeprefix("s3://") if uri.startswith("s3://") else os.path.abspath(uri)


FILE_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".ndjson")


def _is_folder(uri: str, opts: dict[str, Any], fs: Any = None) -> bool:
    if not uri.startswith("s3://"):
        return os.path.isdir(uri)  # a built-in (sklearn:digits) or a glob is no folder
    if any(c in uri for c in "*?[") or uri.endswith(FILE_SUFFIXES):
        return False  # no request to S3 for what is named as a file or glob
    try:
        return bool((fs or filesystem_for(uri, opts)).isdir(_path(uri)))
    except S3_ERRORS:
        return False


def _split_source(split: str, uri: str, opts: dict[str, Any], where: str) -> SplitSource:
    """A given split's source; a `save_to_disk` split folder (its `state.json`) is read as Arrow."""
    fs = filesystem_for(uri, opts)
    path = _path(uri)
    try:
        if _is_folder(uri, opts, fs) and fs.exists(f"{path}/state.json"):
            return SplitSource(split, uri, _state_files(fs, path, where), where)
    except (*S3_ERRORS, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {uri}: {describe_s3_error(exc)}", where=where) from None
    return SplitSource(split, uri, where=where)


def _state_files(fs: Any, folder: str, where: str) -> tuple[str, ...]:
    """A `save_to_disk` split folder's Arrow files, as its state.json lists them."""
    state = json.loads(fs.cat_file(f"{folder}/state.json"))
    files = tuple(f"{folder}/{f['filename']}" for f in state.get("_data_files", []))
    if not files:
        raise UserError(f"{folder}/state.json lists no Arrow data files", where=where)
    return files


def _uri(source: str, path: str) -> str:
    return f"s3://{path}" if source.startswith("s3://") else path


def _discover(source: str, opts: dict[str, Any], any_folder: bool = False) -> Layout:
    """A folder's layout (the module's list, in order); one table when it has Parquet files and no layout."""
    fs = filesystem_for(source, opts)
    root = _path(source).rstrip("/")
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(root, detail=False)}
        if "dataset_dict.json" in names:
            return _save_to_disk(source, fs, root)
        if "state.json" in names:  # one Dataset's save_to_disk folder: a single table
            return Layout(SAVE_TO_DISK, table=SplitSource("", source, _state_files(fs, root, "source")))
        found = _hf_parquet(fs, f"{root}/data") if fs.isdir(f"{root}/data") else {}
        found = found or _hf_parquet(fs, root)
        if found:
            return _complete(Layout("hf-parquet", {k: SplitSource(k, _uri(source, g)) for k, g in found.items()}),
                             "source")
        files = _split_files(fs, root, names)
        if files:
            return _complete(Layout("files", {k: SplitSource(k, _uri(source, p)) for k, p in files.items()}),
                             "source")
        if not any_folder and not any(p.endswith(".parquet") for p in fs.find(root)):
            raise UserError(f"{source} holds no Parquet files and no train/validation/test layout (split files "
                            "or folders, data/<split>-*.parquet, a save_to_disk folder)", where="source")
    except (*S3_ERRORS, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {source}: {describe_s3_error(exc)}", where="source") from None
    return Layout("fractions", table=SplitSource("", source))


def _save_to_disk(source: str, fs: Any, root: str) -> Layout:
    info = json.loads(fs.cat_file(f"{root}/dataset_dict.json"))
    sources = {}
    for name in info.get("splits", []):
        if name in NAMES and NAMES[name] not in sources:
            sources[NAMES[name]] = SplitSource(NAMES[name], _uri(source, f"{root}/{name}"),
                                               _state_files(fs, f"{root}/{name}", "source"))
    return _complete(Layout(SAVE_TO_DISK, sources), "source")


def _hf_parquet(fs: Any, folder: str) -> dict[str, str]:
    """Hugging Face's `<split>-00000-of-00001.parquet` files of a folder, as a glob per split."""
    out: dict[str, str] = {}
    for p in fs.ls(folder, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        m = re.match(r"^([A-Za-z]+)-\d+-of-\d+\.parquet$", name)
        if m and m.group(1) in NAMES:
            out.setdefault(NAMES[m.group(1)], f"{folder}/{m.group(1)}-*.parquet")
    return out


def _split_files(fs: Any, root: str, names: dict[str, str]) -> dict[str, str]:
    """`train.parquet`, `validation.parquet`, ... files or `train/`, `validation/`, ... Parquet folders."""
    out: dict[str, str] = {}
    for name, path in sorted(names.items()):
        stem = name.removesuffix(".parquet")
        if stem not in NAMES or NAMES[stem] in out:
            continue
        if name.endswith(".parquet") or fs.isdir(path):
            out[NAMES[stem]] = path.rstrip("/")
    return out
