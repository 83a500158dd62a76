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

    def under(self, key: str) -> UserError:
        """The same error named inside the workflow: tasks/ names its own argument ('source'), orchestrator/
        the section it came from ('data' -> 'data.source'); an error without a name gets `key` itself."""
        return UserError(self.message, where=f"{key}.{self.where}" if self.where else key)


class ShardFailed(RuntimeError):
    """A shard kept failing after its retries; the shards already written stay."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage {stage} failed: {message}")
