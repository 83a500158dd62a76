"""A user's mistake raised on a Ray worker reaches the driver whole (its class and the key it names)."""

from __future__ import annotations

import pytest


def test_a_users_mistake_raised_on_a_worker_reaches_the_driver_whole(ray_session: None) -> None:
    """A UserError crosses Ray with its class and `where` (a subclass with its own constructor too), and is
    found inside a Ray task's error or a Ray Train run's per-worker failures, so the CLI exits 2 with it."""
    import pickle

    import ray
    from ray.train.v2.api.exceptions import WorkerGroupError

    from tasks.errors import UserError, user_error_in
    from tasks.pieces import Piece, SourceChanged

    changed = SourceChanged(Piece(name="part-1.parquet", path="/d/part-1.parquet", row_group=6, start=0, rows=9))
    back = pickle.loads(pickle.dumps(changed))
    assert type(back) is SourceChanged and back.where == "source" and str(back) == str(changed)

    @ray.remote(max_retries=0)
    def read() -> None:
        raise changed

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(read.remote())
    found = user_error_in(err.value)
    assert isinstance(found, SourceChanged) and found.under("data").where == "data.source"
    assert "part-1.parquet (row group 6) changed" in found.message
    wrapped = WorkerGroupError("training failed", {0: RuntimeError("rank 0 ok"), 1: UserError("no", where="k")})
    assert user_error_in(wrapped).where == "k"
    assert user_error_in(RuntimeError("the teacher's own bug")) is None
