"""The MLflow server away for a while: MLflow's own HTTP retries, under kdflow's policy and saying so.

MLflow retries its REST calls itself (urllib3's `Retry`, up to 7 times with waits up to 120 s), silently:
a run whose tracking server restarts looks hung for minutes. kdflow sets MLflow's policy from
`tracking.retries` (its public environment variables) and makes each retry say one line on stderr
("MLflow server ... unreachable, retrying 3/8"). The line needs MLflow's session: there is no public hook
for it, so this one module swaps the `Retry` of the session MLflow builds (`request_utils`) for a
subclass that speaks, and nothing else in kdflow touches MLflow's HTTP layer. When the retries run out,
`outage` turns MLflow's error into the UserError the CLI prints (exit 2 naming tracking.uri).
"""

from __future__ import annotations

import os
from typing import Any

from urllib3.util.retry import Retry

from tasks.errors import UserError
from tasks.retry import Retries, is_outage, say


class SayingRetry(Retry):
    """urllib3's Retry that says each retry of an unreachable or failing server on stderr."""

    def increment(self, method: Any = None, url: Any = None, response: Any = None, error: Any = None,
                  _pool: Any = None, _stacktrace: Any = None) -> Retry:
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        host = f"{_pool.host}:{_pool.port}" if _pool is not None else "server"
        why = f"HTTP {response.status}" if response is not None and error is None else "unreachable"
        done = len(new.history)  # retries so far; `total` counts down the ones left
        left = new.total if isinstance(new.total, int) else 0
        say(f"MLflow server {host} {why}, retrying {done}/{done + left} in {new.get_backoff_time():.0f} s")
        return new


def install(retries: Retries) -> None:
    """MLflow's HTTP calls in this process retry as `retries` says, each retry said on stderr."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max(retries.attempts - 1, 0))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(max(int(retries.first_s * 2), 1))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"
    Retry.DEFAULT_BACKOFF_MAX = retries.max_wait_s  # read by every Retry that sets no backoff_max
    from mlflow.utils import request_utils

    build = request_utils._cached_get_request_session
    if getattr(build, "kdflow_saying", False):
        return

    def session(*args: Any, **kwargs: Any) -> Any:
        s = build(*args, **kwargs)
        adapter = s.get_adapter("http://")
        old = adapter.max_retries
        if not isinstance(old, SayingRetry):
            adapter.max_retries = SayingRetry(
                total=old.total, connect=old.connect, read=old.read, redirect=old.redirect, status=old.status,
                status_forcelist=old.status_forcelist, backoff_factor=old.backoff_factor,
                backoff_max=retries.max_wait_s, allowed_methods=old.allowed_methods,
                raise_on_status=old.raise_on_status,
                respect_retry_after_header=old.respect_retry_after_header)
        return s

    session.kdflow_saying = True  # type: ignore[attr-defined]
    session.cache_clear = build.cache_clear  # type: ignore[attr-defined]
    request_utils._cached_get_request_session = session


def outage(exc: BaseException, uri: str) -> UserError | None:
    """The UserError for an MLflow call that failed because the server at `uri` stayed away, else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    text = str(exc)
    if is_outage(exc) or "Max retries exceeded" in text or "too many 5" in text.lower():
        return UserError(f"the MLflow tracking server at {uri} stayed unreachable through every retry "
                         f"(tracking.retries); finished work is kept: rerun to resume", where="tracking.uri")
    return None
