"""Riding out an outage (tasks/retry.py): what is retried, what is not, and how a cut stream goes on."""

from __future__ import annotations

import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks.errors import UserError
from tasks.retry import Retries, is_outage, retried, retried_stream

FAST = Retries(attempts=4, max_wait_s=0.01, first_s=0.001)


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket closes


def test_outages_are_told_from_mistakes() -> None:
    assert is_outage(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_outage(ClientError({"Error": {"Code": "SlowDown", "Message": "x"}}, "PutObject"))
    assert is_outage(ClientError({"Error": {"Code": "503", "Message": "x"}}, "GetObject"))
    assert not is_outage(ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject"))
    assert not is_outage(ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "ListObjects"))
    assert not is_outage(FileNotFoundError("s3://b/k"))
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", refused_port()), timeout=2)
    assert is_outage(refused.value)
    try:  # an outage wrapped by a library's own error still counts
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as inner:
            raise OSError("request failed") from inner
    except OSError as wrapped:
        assert is_outage(wrapped)


def test_retried_rides_out_an_outage_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert retried(flaky, service="S3", retries=FAST) == "ok"
    assert len(calls) == 3
    err = capsys.readouterr().err
    assert "S3 unreachable, retrying 2/4" in err and "S3 unreachable, retrying 3/4" in err


def test_retried_gives_up_with_a_user_error_naming_the_service() -> None:
    calls = []

    def away() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(UserError) as exc:
        retried(away, service="S3 (http://127.0.0.1:9)", retries=FAST, where="s3://bucket/key")
    assert len(calls) == FAST.attempts
    assert "S3 (http://127.0.0.1:9) unreachable after 4 attempts" in str(exc.value)
    assert exc.value.where == "s3://bucket/key"


def test_a_mistake_is_not_retried() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")

    with pytest.raises(ClientError):
        retried(denied, service="S3", retries=FAST)
    assert len(calls) == 1


def test_a_cut_stream_goes_on_where_it_stopped() -> None:
    """Items already given are not given again, and attempts count from the last progress: a stream cut
    five times (more than the policy's 4 attempts), each after progress, still ends whole."""
    cuts = {3, 5, 6, 8, 11}
    opened = []

    def open_from(n: int):
        opened.append(n)
        for i in range(n, 12):
            if i in cuts:
                cuts.discard(i)
                raise ConnectionResetError(104, "Connection reset by peer")
            yield i

    assert list(retried_stream(open_from, service="S3", retries=FAST)) == list(range(12))
    assert opened == [0, 3, 5, 6, 8, 11]


def test_a_stream_that_never_comes_back_gives_up() -> None:
    def open_from(n: int):
        yield from range(n, 2)
        raise ConnectionRefusedError(111, "Connection refused")

    got: list[int] = []
    with pytest.raises(UserError, match="unreachable after 4 attempts"):
        got.extend(retried_stream(open_from, service="S3", retries=FAST))
    assert got == [0, 1]


class Planted:
    def __reduce__(self):  # what a malicious file does: run code when unpickled
        return (print, ("planted code ran",))


def test_kdflow_reads_its_own_torch_files_without_running_code(tmp_path, capsys) -> None:
    """A file in a shared store that holds a pickled object, not tensors and plain values, is refused
    naming it, and its code never runs (weights_only loading)."""
    import torch

    from tasks.storage import Storage

    storage = Storage(str(tmp_path))
    storage.write_torch(storage.path("ok.pt"), {"state_dict": {"w": torch.ones(2)}, "history": [{"loss": 0.5}]})
    assert storage.read_torch(storage.path("ok.pt"))["history"] == [{"loss": 0.5}]
    torch.save({"state_dict": Planted()}, tmp_path / "planted.pt")
    with pytest.raises(UserError, match="not a file kdflow wrote") as exc:
        storage.read_torch(storage.path("planted.pt"))
    assert exc.value.where.endswith("planted.pt")
    assert "planted code ran" not in capsys.readouterr().out
