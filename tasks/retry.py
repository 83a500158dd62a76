"""Riding out a service that is away for a while (S3, the MLflow server): retry with backoff, say so on
stderr, then give up with a UserError naming the service.

One policy for every caller: `Retries` (attempts and the longest wait between them) comes from the
workflow (`storage.retries`, `tracking.retries`); `retried` runs a call under it, retrying only what
`transient` calls an outage (connection refused or reset, timeouts, 5xx, throttling), never a user's
mistake (no such bucket, access denied), which fails at once as before.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tasks.errors import UserError

T = TypeVar("T")

# names of exceptions (anywhere in the chain) that mean "the service is not answering right now"
_OUTAGE_TYPES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ServerDisconnectedError",
    "ClientConnectorError", "ClientOSError", "TimeoutError", "FSTimeoutError", "IncompleteRead",
    "ProxyConnectionError", "HTTPClientError", "ResponseParserError", "BrokenPipeError",
}
_OUTAGE_CODES = {"500", "502", "503", "504", "SlowDown", "ServiceUnavailable", "InternalError",
                 "RequestTimeout", "Throttling", "ThrottlingException"}
_OUTAGE_WORDS = ("connection refused", "could not connect", "connection reset", "timed out",
                 "service unavailable", "bad gateway", "gateway timeout", "connection aborted",
                 "remote end closed", "server disconnected", "name or service not known",
                 "temporary failure in name resolution", "errno 111", "errno 104")


@dataclass(frozen=True)
class Retries:
    """How long to wait for a service that is away: `attempts` tries in all, waits doubling from
    `first_s` up to `max_wait_s` (with jitter, so many workers do not knock at once)."""

    attempts: int = 8
    max_wait_s: float = 15.0
    first_s: float = 0.5

    def waits(self) -> Iterator[float]:
        wait = self.first_s
        for _ in range(max(self.attempts - 1, 0)):
            yield min(wait, self.max_wait_s) * (0.75 + 0.5 * random.random())
            wait *= 2

    @property
    def patience_s(self) -> float:
        """About how long the whole policy waits before giving up."""
        total, wait = 0.0, self.first_s
        for _ in range(max(self.attempts - 1, 0)):
            total += min(wait, self.max_wait_s)
            wait *= 2
        return total


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_outage(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the service did not answer, not that it said no."""
    for e in chain(exc):
        if type(e).__name__ in _OUTAGE_TYPES:
            return True
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) \
            if isinstance(getattr(e, "response", None), dict) else ""
        status = getattr(getattr(e, "response", None), "status_code", None)
        if code in _OUTAGE_CODES or (isinstance(status, int) and status >= 500):
            return True
        text = str(e).lower()
        if any(w in text for w in _OUTAGE_WORDS):
            return True
    return False


def say(line: str) -> None:
    sys.stderr.write(f"kdflow: {line}\n")  # one write: a line from another thread cannot land inside it
    sys.stderr.flush()


class Patience:
    """One outage's waiting: each failure either waits (saying so) or gives up with the UserError; the
    attempts start again after progress (`reset`)."""

    def __init__(self, service: str, retries: Retries, transient: Callable[[BaseException], bool],
                 where: str | None) -> None:
        self.service, self.retries, self.transient, self.where = service, retries, transient, where
        self.reset()

    def reset(self) -> None:
        self.waits, self.attempt = self.retries.waits(), 1

    def wait_or_give_up(self, exc: Exception, note: str = "") -> None:
        """Re-raise `exc` if it is not an outage; raise the UserError if the attempts are spent; else wait."""
        if isinstance(exc, UserError) or not self.transient(exc):
            raise exc
        wait = next(self.waits, None)
        if wait is None:
            raise UserError(f"{self.service} unreachable after {self.attempt} attempts over "
                            f"{self.retries.patience_s:.0f} s: {short(exc)}", where=self.where) from None
        self.attempt += 1
        say(f"{self.service} unreachable, retrying {self.attempt}/{self.retries.attempts} in {wait:.1f} s{note}")
        time.sleep(wait)


def retried(call: Callable[[], T], *, service: str, retries: Retries,
            transient: Callable[[BaseException], bool] = is_outage, where: str | None = None) -> T:
    """`call()`, retried while it fails with an outage; after the last attempt a UserError naming the
    service (and `where`, the key that configures it). Other errors pass through untouched."""
    patience = Patience(service, retries, transient, where)
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted by wait_or_give_up: outage or re-raised
            patience.wait_or_give_up(exc)


def short(exc: BaseException) -> str:
    """The outage in one line, without URLs' credentials or a stack."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def retried_stream(open_from: Callable[[int], Iterator[T]], *, service: str, retries: Retries,
                   where: str | None = None, transient: Callable[[BaseException], bool] = is_outage) -> Iterator[T]:
    """The items of a stream that an outage may cut: `open_from(n)` yields the stream's items from the n-th
    on, and after a cut the stream is opened again where it stopped (items already given are not given
    twice). The attempts count from the last item that came through: a long read that is cut several
    times, each after progress, is not given up on."""
    given = 0
    patience = Patience(service, retries, transient, where)
    while True:
        try:
            for item in open_from(given):
                yield item
                given += 1
                patience.reset()
            return
        except Exception as exc:  # noqa: BLE001 - sorted by wait_or_give_up: outage or re-raised
            patience.wait_or_give_up(exc, f" (from item {given})")
