"""Small workflows for tests: digits, tiny models, few epochs, so a whole run takes seconds."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import set_dotted

SMALL: dict[str, Any] = {
    "name": "test-digits",
    "seed": 0,
    "storage": {"root": ".kdflow"},
    "data": {"source": "sklearn:digits", "split": {"val": 0.15, "test": 0.15}},
    "teacher": {"model": "mlp", "params": {"hidden": [64]}, "train": {"epochs": 8, "batch_size": 64, "lr": 0.003}},
    "soft_targets": {"shards": 3, "format": "logits", "dtype": "float16"},
    "student": {"model": "mlp", "params": {"hidden": [16]}},
    "distill": {"loss": "kl", "temperature": 4.0, "alpha": 0.7},
    "train": {"epochs": 6, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.01}, "workers": 1},
    "registry": {"model": "test-digits-student"},
}


def workflow(**overrides: Any) -> dict[str, Any]:
    """SMALL with dotted-key overrides: workflow(**{"distill.alpha": 0.5})."""
    spec = copy.deepcopy(SMALL)
    for key, value in overrides.items():
        set_dotted(spec, key, value)
    return spec


def write_workflow(folder: Path, name: str = "wf.yaml", **overrides: Any) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(workflow(**overrides), sort_keys=False))
    return path


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Independent commands (ones that change nothing, or are all refused) run at the same time; their
    results in the order given. Each is still its own process, as a user runs it."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def precompute(store: Any, key: str, teachers: list[Any], splits: dict[str, Any], *, kind: Any = None,
               format: str = "logits", dtype: str = "float16", top_k: int | None = None,
               ensemble: str = "mean_probs", shards: int = 3, meta: dict[str, Any] | None = None,
               width: int | None = None, **rest: Any) -> Any:
    """tasks.store.precompute.precompute with a test's usual encoding: classification, float16 logits."""
    from tasks.kinds import kind_for
    from tasks.store.precompute import Encoding
    from tasks.store.precompute import precompute as run

    kind = kind or kind_for("classification")
    meta = dict(meta or {})
    if width is None:
        width = int(meta.get("num_classes") or meta.get("vocab_size") or 10)
    return run(store, key, teachers, splits, encoding=Encoding(kind, format, dtype, top_k, ensemble), shards=shards,
               width=width, meta=meta, **rest)


def quick_teacher(x: Any, y: Any, hidden: int = 64, steps: int = 150) -> Any:
    """A teacher trained full-batch in-process in about a second: soft targets worth distilling."""
    import torch

    from tasks.kinds.classification.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [hidden]}, x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


# a small search space over the temperature, alpha and the student's width
SPACE = {"distill.temperature": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
         "distill.alpha": {"type": "float", "low": 0.2, "high": 0.95},
         "student.params.hidden": {"type": "categorical", "choices": [[8], [16], [32]]}}


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid` (a command started with start_new_session, and what it started)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], check=False, capture_output=True, text=True).stdout
    return [int(p) for p, s, stat in (line.split()[:3] for line in out.splitlines()) if int(s) == sid
            and not stat.startswith("Z")]


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a command started with start_new_session and everything in its session (Ray gives its workers
    process groups of their own and renames them, so neither killpg nor a command line finds all)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not session_pids(proc.pid)
