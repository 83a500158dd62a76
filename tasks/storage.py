"""One way to read and write storage: a local folder or s3://bucket/prefix, through fsspec.

A `Storage` is a small picklable value (root + S3 options); Ray tasks and train workers rebuild the
filesystem from it. Writes are atomic: a local file is written under a temporary name and renamed, an
S3 object is put whole, so a reader never sees half a file.

The S3 endpoint is pinned when the value is made (from `storage.s3.endpoint_url`, else the driver's
AWS_ENDPOINT_URL): a worker whose environment lacks it must still talk to the same server, never to AWS.
Credentials are not pinned: each process takes its own from its environment or instance role.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from botocore.exceptions import BotoCoreError, ClientError

from tasks.errors import UserError
from tasks.retry import Retries, retried

# what reaching S3 can raise besides FileNotFoundError: s3fs maps most replies to OSError subclasses,
# botocore raises its own for missing credentials and unreachable endpoints
S3_ERRORS = (OSError, BotoCoreError, ClientError)
TEMP_MARK = ".tmp-"  # a local write in progress: <name>.tmp-<random>, renamed to <name> when whole


@dataclass(frozen=True)
class Storage:
    root: str
    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False
    retries: Retries = field(default_factory=Retries)  # an S3 server away for a while (storage.retries)
    _fs: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.root.startswith("s3://"):  # workers run elsewhere: pin the folder now
            object.__setattr__(self, "root", os.path.abspath(os.path.expanduser(self.root)))
        elif self.endpoint_url is None:
            object.__setattr__(self, "endpoint_url", env_endpoint())

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
        endpoint = self.endpoint_url or env_endpoint()
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

    def _s3(self, call: Any, path: str) -> Any:
        """`call()`, riding out an S3 outage under `retries` (a local folder is called once)."""
        if not self.is_s3:
            return call()
        return retried(call, service=f"S3 ({self.endpoint_url or 'AWS'})", retries=self.retries,
                       where=self._display(path))

    def exists(self, path: str) -> bool:
        try:
            return self._s3(lambda: self.fs.exists(path), path)
        except S3_ERRORS as exc:  # missing credentials, denied access: name the object, not the stack
            raise UserError(f"cannot check: {describe_s3_error(exc)}", where=self._display(path)) from None

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._s3(lambda: self.fs.cat_file(path), path)
        except FileNotFoundError:
            raise UserError("no such object", where=self._display(path)) from None
        except S3_ERRORS as exc:
            raise UserError(f"cannot read: {describe_s3_error(exc)}", where=self._display(path)) from None

    def size(self, path: str) -> int | None:
        """Size in bytes, or None when there is no such object."""
        try:
            return int(self._s3(lambda: self.fs.size(path), path))
        except FileNotFoundError:
            return None
        except S3_ERRORS as exc:
            raise UserError(f"cannot check: {describe_s3_error(exc)}", where=self._display(path)) from None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole object atomically (temp + rename locally; one PUT on S3)."""
        if self.is_s3:  # one PUT, so a retried write replaces, never duplicates
            try:
                self._s3(lambda: self.fs.pipe_file(path, data), path)
            except S3_ERRORS as exc:
                raise UserError(f"cannot write: {describe_s3_error(exc)}", where=self._display(path)) from None
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write_torch(self, path: str, obj: Any) -> None:
        """torch.save `obj` (weights, histories) to one object, atomically like every write."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(path, buf.getvalue())

    def read_torch(self, path: str) -> Any:
        """What `write_torch` wrote, on the CPU (`load_torch`: tensors and plain values only, never code)."""
        return load_torch(self.read_bytes(path), self._display(path))

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(p.rstrip("/") for p in self._s3(lambda: self.fs.ls(path, detail=False), path))
        except FileNotFoundError:
            return []
        except S3_ERRORS as exc:
            raise UserError(f"cannot list: {describe_s3_error(exc)}", where=self._display(path)) from None

    def remove_stale_temps(self, folder: str, older_than_s: float = 0.0) -> int:
        """Delete the temp files that killed writers left in a local folder; returns how many."""
        if self.is_s3 or not os.path.isdir(folder):
            return 0
        removed = 0
        now = time.time()
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                if TEMP_MARK in name and now - os.path.getmtime(path) >= older_than_s:
                    os.remove(path)
                    removed += 1
        return removed

    def rm(self, path: str) -> None:
        if self.exists(path):
            self._s3(lambda: self.fs.rm(path, recursive=True), path)

    def pyarrow_fs(self) -> Any:
        """A pyarrow filesystem for libraries that want one (Ray Train checkpoints)."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def check(self, create: bool = True) -> None:
        """Fail early, naming the bucket or folder, if the root cannot be reached (or, locally, created).

        The error names no key: the caller knows where the root came from (storage.root, --root)."""
        if not self.is_s3:
            if not create:
                return
            try:
                os.makedirs(self.base, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create the storage folder: {exc.strerror}") from None
            return
        bucket = self.base.split("/")[0]
        try:
            self.fs.ls(bucket, refresh=True)  # not retried: before any work, unreachable is most often a typo
        except FileNotFoundError:
            raise UserError(f"bucket {bucket!r} does not exist") from None
        except S3_ERRORS as exc:  # name the cause, not the stack
            raise UserError(f"cannot reach bucket {bucket!r}: {describe_s3_error(exc)}") from None

    def _display(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 and not path.startswith("s3://") else path


def load_torch(data: bytes | str, where: str) -> Any:
    """A torch file kdflow wrote (weights, optimizer state, histories), from its bytes or path, on the CPU.

    `weights_only=True`: tensors, numbers, strings, lists and dicts load; anything else (a pickled object,
    code) is refused as not kdflow's, exit 2 naming the file, so a file planted in a shared store cannot
    run code in the process that reads it."""
    import io
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu",
                          weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise UserError(f"not a file kdflow wrote (or damaged): {str(exc).splitlines()[0][:200]}",
                        where=where) from None


def env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


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
        # An outage is kdflow's to ride out (tasks/retry.py: storage.retries, a line on stderr per retry):
        # s3fs's and botocore's own silent retries (5 x 5 attempts by default) are cut to a couple of quick
        # ones, so a blip still passes unseen but a real outage is said and bounded by the workflow's policy.
        opts.setdefault("config_kwargs", {"retries": {"max_attempts": 2, "mode": "standard"}})
        # no listings cache: objects that Ray workers write must be visible to the driver at once
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
        fs.retries = 2  # a class attribute in s3fs (5), not a constructor argument
        return fs
    return fsspec.filesystem("file", auto_mkdir=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
