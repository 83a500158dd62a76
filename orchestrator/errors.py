"""The one error type for user mistakes: the CLI turns it into a short message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (YAML key, path, bucket, server, factory): exit 2, no traceback.

    `where` names the YAML key or the resource, so the message points at what to fix.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
