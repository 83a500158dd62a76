"""What only works on one machine is refused naming its key when the cluster has several (orchestrator/cluster.py)."""

from __future__ import annotations

import pytest

from orchestrator.cluster import NodeInfo, check
from orchestrator.spec import validate
from tasks.errors import UserError
from tests.helpers import workflow


def test_check_refuses_what_one_machine_only_can_do() -> None:
    two = [NodeInfo("a" * 56, "host1", "/tmp/ray-a/session_1"), NodeInfo("b" * 56, "host2", "/tmp/ray-b/session_1")]
    good = validate(workflow(**{"storage.root": "s3://b/runs", "tracking.uri": "http://mlflow:5000"}))
    check(good, two, {})
    check(validate(workflow()), two[:1], {})  # one node: local disk and embedded stores are fine
    cases = [({}, "storage.root"), ({"storage.root": "s3://b/r"}, "tracking.uri"),
             ({"storage.root": "s3://b/r", "tracking.uri": "sqlite:///mlflow.db"}, "tracking.uri"),
             ({"storage.root": "s3://b/r", "tracking.uri": "http://m:5000",
               "search": {"trials": 2, "space": {"distill.alpha": {"type": "float", "low": 0.1, "high": 0.9}}}},
              "search.storage")]
    for overrides, key in cases:
        with pytest.raises(UserError) as err:
            check(validate(workflow(**overrides)), two, {})
        assert err.value.where == key, (overrides, str(err.value))
    # the tracking server may come from the job's environment (kdflow submit --forward-env MLFLOW_TRACKING_URI)
    check(validate(workflow(**{"storage.root": "s3://b/r"})), two, {"MLFLOW_TRACKING_URI": "http://m:5000"})
    # two nodes on one host sharing one temp dir: the job's working directory would vanish under the driver
    shared = [two[0], NodeInfo("b" * 56, "host1", "/tmp/ray-a/session_1")]
    with pytest.raises(UserError, match="--temp-dir") as err:
        check(good, shared, {})
    assert err.value.where == "ray start --temp-dir"
