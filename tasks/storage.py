"""One way to read and write storage: a local folder or s3://bucket/prefix, through fsspec.

A `Storage` is a small picklable value (root + S3 options); Ray tasks and train workers rebuild the
filesystem from it. Writes are atomic: a local file is written under a temporary name and renamed, an
S3 object is put whole, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from orchestrator.errors import UserError


@dataclass(frozen=True)
class Storage:
    root: str
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    _fs: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.root.startswith("s3://"):  # workers run elsewhere: pin the folder now
            object.__setattr__(self, "root", os.path.abspath(os.path.expanduser(self.root)))

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def base(self) -> str:
        """The root as the filesystem sees it (no scheme, absolute for local paths)."""
        if self.is_s3:
            return self.root[len("s3://"):].rstrip("/")
        return os.path.abspath(os.path.expanduser(self.root))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            object.__setattr__(self, "_fs", filesystem_for(self.root, self.s3_options()))
        return self._fs

    def s3_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        if self.anon:
            opts["anon"] = True
        return opts

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        p = self.path(*parts)
        return f"s3://{p}" if self.is_s3 else p

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise UserError("no such object", where=self._display(path)) from None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole object atomically (temp + rename locally; one PUT on S3)."""
        if self.is_s3:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def rm(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def pyarrow_fs(self) -> Any:
        """A pyarrow filesystem for libraries that want one (Ray Train checkpoints)."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def check(self) -> None:
        """Fail early, naming the bucket or folder, if the root cannot be written."""
        if not self.is_s3:
            try:
                os.makedirs(self.base, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create the storage folder: {exc.strerror}", where="storage.root") from None
            return
        bucket = self.base.split("/")[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise UserError(f"bucket {bucket!r} does not exist", where="storage.root") from None
        except Exception as exc:  # botocore raises many types; name the cause, not the stack
            raise UserError(f"cannot reach bucket {bucket!r}: {describe_s3_error(exc)}",
                            where="storage.root") from None

    def _display(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 and not path.startswith("s3://") else path


def describe_s3_error(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc) or name
    if "credential" in text.lower() or name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if "Could not connect" in text or "Connect" in name:
        return f"endpoint unreachable ({text})"
    return f"{name}: {text}"


def filesystem_for(url: str, s3_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    if url.startswith("s3://"):
        import s3fs

        opts = dict(s3_options or {})
        return s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    return fsspec.filesystem("file", auto_mkdir=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
