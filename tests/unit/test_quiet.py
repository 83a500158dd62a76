"""What kdflow drops from the worker output Ray copies to the driver: only known noise, never a real error."""

from __future__ import annotations

from orchestrator.quiet import drop_noise

# as Ray Train's controller printed it on this machine under load (Ray 2.60), prefixes removed
RESOURCE_REQUEST_TIMEOUT = [
    ("Failed to send resource request for train-5f4a444886ac4d91b4ba65faf543baf3. If this only happens transiently "
    "during network partition or CPU being overloaded, it's safe to ignore this error. If this error persists, "
    "file a GitHub issue."),
    "Traceback (most recent call last):",
    ('  File ".../ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", line 58, in '
    "send_resource_request"),
    "    ray.get(",
    '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]
USER_ERROR = [
    "Traceback (most recent call last):",
    '  File "/home/me/models.py", line 3, in make',
    "    raise ValueError('bad width')",
    "ValueError: bad width",
]


def test_the_resource_request_timeout_and_its_traceback_go_and_everything_else_stays() -> None:
    lines = ["[student] epoch 1/3 loss 0.5", *RESOURCE_REQUEST_TIMEOUT, "[student] epoch 2/3 loss 0.4", *USER_ERROR]
    out, inside = drop_noise(lines, False)
    assert out == ["[student] epoch 1/3 loss 0.5", "[student] epoch 2/3 loss 0.4", *USER_ERROR]
    assert inside is False


def test_a_traceback_split_across_two_batches_is_dropped_whole() -> None:
    lines = [*RESOURCE_REQUEST_TIMEOUT, "[teacher] epoch 5/5 loss 0.1"]
    whole, _ = drop_noise(lines, False)
    for cut in range(1, len(lines)):
        first, inside = drop_noise(lines[:cut], False)
        second, _ = drop_noise(lines[cut:], inside)
        assert first + second == whole == ["[teacher] epoch 5/5 loss 0.1"], cut


def test_the_preemption_watcher_line_goes_alone() -> None:
    line = ("Actor with class name: 'PreemptionWatcher' and ID: 'abc' has constructor arguments in the object store "
            "and max_call_depth is set")
    assert drop_noise([line, "real warning: disk full"], False) == (["real warning: disk full"], False)


def test_colour_codes_are_stripped_from_worker_lines_when_stderr_is_not_a_terminal() -> None:
    from orchestrator.quiet import _filtered

    got: list[dict] = []
    emit = _filtered(got.append)  # pytest captures stderr: not a terminal
    emit({"pid": 7, "lines": ["[student] epoch 20/20 loss 0.5\x1b[32m [repeated 13x across cluster]\x1b[0m"]})
    assert got[0]["lines"] == ["[student] epoch 20/20 loss 0.5 [repeated 13x across cluster]"]
