"""Image rows with stored views in the soft-target store, on the session's local Ray: a precompute that lost
shards (as a killed one does: whole files kept, no manifest) computes only the missing ones, and the resumed
entry is the one an uninterrupted precompute writes, byte for byte. (The kill itself, a process group killed
mid-precompute, is tests/integration/test_soft_targets.py's; the store is the same for every kind.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.kinds import kind_for
from tasks.kinds.image_classification.models import build_model
from tasks.kinds.image_classification.spec import AugmentSpec
from tasks.kinds.image_classification.views import draw_views
from tasks.storage import Storage
from tasks.store.precompute import compute_shards
from tests.helpers import precompute

DIMS = {"channels": 1, "height": 8, "width": 8, "num_classes": 4, "mean": [100.0], "std": [60.0]}
ARGS = {"format": "topk", "top_k": 3, "dtype": "float16", "shards": 4, "meta": {"views": 3}, "width": 4,
        "max_retries": 0}


def in_process(*args):  # the warm runner's call, in this process: the arguments' Ray objects fetched
    import ray

    return compute_shards(*[ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args])


def test_an_image_precompute_that_lost_shards_resumes_only_those(ray_session: None, workdir: Path) -> None:
    from tasks.store.store import SoftTargetStore

    rng = np.random.default_rng(0)
    n = 80
    views = draw_views(np.arange(n), 3, AugmentSpec(rotate=10), seed=0).reshape(n, -1)
    train = np.concatenate([rng.integers(0, 256, (n, 64)), views], axis=1).astype(np.uint8)
    splits = {"train": (train, rng.integers(0, 4, n)), "val": (rng.integers(0, 256, (10, 64)).astype(np.uint8),
                                                                rng.integers(0, 4, 10)),
              "test": (rng.integers(0, 256, (10, 64)).astype(np.uint8), rng.integers(0, 4, 10))}
    torch.manual_seed(0)
    teacher = build_model("cnn", {"channels": [4]}, DIMS).eval()
    kind, store = kind_for("image_classification"), SoftTargetStore(Storage(".kdflow"))
    whole, _ = precompute(store, "whole", [teacher], splits, kind=kind, runner=in_process, **ARGS)
    assert whole["splits"]["train"]["rows"] == n
    train_rows = store.read(whole, "train")
    assert train_rows.targets["topk_values"].shape == (n, 3 * 3) and train_rows.targets["tail_logmass"].shape == (n, 3)

    precompute(store, "lost", [teacher], splits, kind=kind, runner=in_process, **ARGS)
    entry = workdir / ".kdflow" / "soft_targets" / "lost"
    (entry / "manifest.json").unlink()
    files = sorted(entry.rglob("*.parquet"))
    lost = files[1:3]
    for f in lost:
        f.unlink()
    kept = {p: p.stat().st_mtime_ns for p in files if p not in lost}
    resumed, stats = precompute(store, "lost", [teacher], splits, kind=kind, runner=in_process, **ARGS)
    assert not stats.reused and stats.computed_shards == len(lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the whole shards were not rewritten
    shards = {k: [(s["path"], s["rows"], s["sha256"]) for sp in ("train", "val", "test") for s in m["splits"][sp]["shards"]]
              for k, m in (("resumed", resumed), ("whole", whole))}
    assert shards["resumed"] == shards["whole"]
