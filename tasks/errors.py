"""The errors of kdflow, in the lower layer so that tasks/ and orchestrator/ raise the same types.

`UserError` is the one type for user mistakes: the CLI turns it into a short message and exit code 2.
`ShardFailed` and `StageFailed` are failures of the work itself (exit 1, naming what was kept).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (YAML key, path, bucket, server, factory): exit 2, no traceback.

    `where` names the YAML key or the resource, so the message points at what to fix.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple:
        """Pickled with its message and `where` (and its own class), so an error raised in a Ray task or
        actor reaches the driver whole: Exception's default keeps only the joined text, and a subclass
        whose constructor takes other arguments (`SourceChanged`) could not be rebuilt at all."""
        return _rebuild, (type(self), self.message, self.where)

    def under(self, key: str) -> UserError:
        """The same error named inside the workflow: tasks/ names its own argument ('source'), orchestrator/
        the section it came from ('data' -> 'data.source'); an error without a name gets `key` itself."""
        return UserError(self.message, where=f"{key}.{self.where}" if self.where else key)


def _rebuild(cls: type[UserError], message: str, where: str | None) -> UserError:
    exc = cls.__new__(cls)
    UserError.__init__(exc, message, where)
    return exc


def user_error_in(exc: BaseException) -> UserError | None:
    """The user's mistake inside an error from a worker, if that is what it is: a Ray task's or actor
    call's `cause`, an exception's `__cause__`, a Ray Train run's per-worker failures (`worker_failures`).
    So a source file changed under a worker exits 2 as it does on the driver, not as a failed stage."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return None


class ShardFailed(RuntimeError):
    """A shard kept failing after its retries; the shards already written stay."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage {stage} failed: {message}")
