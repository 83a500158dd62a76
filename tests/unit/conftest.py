"""The unit tier needs no Ray: a test here that starts one fails (it belongs in tests/integration). In a run
of the whole suite the session's Ray may be up already, started by another tier's test: that one is not
this tier's doing."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray() -> Iterator[None]:
    before = _ray_up()
    yield
    assert before or not _ray_up(), "a unit test started Ray: move it to tests/integration"
