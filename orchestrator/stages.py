"""The stages of a workflow, each with explicit inputs, outputs and cache key.

data -> teachers -> soft targets -> student(s) -> evaluation. Registration lives in registry.py and the
search in search/; pipeline.py runs them in order and builds the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from orchestrator import progress
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher
from tasks.data import Dataset, load_dataset
from tasks.errors import ShardFailed, StageFailed
from tasks.models import build_model
from tasks.soft_targets import SoftTargetStore, cache_key
from tasks.storage import Storage
from tasks.train import FitResult, ShardSource, fit

# ---------------------------------------------------------------- data


def load_data(spec: Workflow, storage: Storage) -> Dataset:
    d = spec.data
    with progress.stage("data", d.source):
        data = load_dataset(d.source, features=d.features, label=d.label, val=d.split.val, test=d.split.test,
                            transfer=d.transfer, seed=spec.seed, limit=d.limit, storage=storage)
        progress.info(f"  {data.num_features} features, {data.num_classes} classes, rows: "
                      + ", ".join(f"{k} {data.rows(k)}" for k in data.y) + f", fingerprint {data.fingerprint[:12]}")
    return data


# ---------------------------------------------------------------- soft targets


def soft_target_key(spec: Workflow, data: Dataset, teachers: list[Teacher]) -> str:
    """Teacher weights x data (rows, split, preprocessing) x format, dtype, top_k, ensemble; never temperature."""
    st = spec.soft_targets
    return cache_key([t.digest for t in teachers], data.fingerprint, st.format, st.dtype, st.top_k, st.ensemble)


def soft_targets(spec: Workflow, data: Dataset, teachers: list[Teacher], storage: Storage) -> dict[str, Any]:
    """The store entry for (teachers x data x format); computed by Ray tasks only when missing."""
    st = spec.soft_targets
    key = soft_target_key(spec, data, teachers)
    store = SoftTargetStore(storage)
    with progress.stage("soft targets", f"{st.format}/{st.dtype} key {key}"):
        train_x, train_y = data.x["train"], data.y["train"]
        if "transfer" in data.x:
            # interleave labeled and transfer rows, so every data-parallel worker's contiguous share
            # holds both kinds (appended, the last worker would get nearly all the unlabeled rows)
            order = np.random.default_rng(spec.seed).permutation(len(train_y) + data.rows("transfer"))
            train_x = np.concatenate([train_x, data.x["transfer"]])[order]
            train_y = np.concatenate([train_y, data.y["transfer"]])[order]
        splits = {"train": (train_x, train_y), "val": (data.x["val"], data.y["val"]),
                  "test": (data.x["test"], data.y["test"])}

        def tick(split: str, i: int, n: int, reused: bool) -> None:
            progress.info(f"  shard {split} {i + 1}/{n} {'(already written)' if reused else 'written'}")

        try:
            manifest = store.precompute(
                key, [t.model for t in teachers], splits, shards=st.shards, format=st.format, dtype=st.dtype,
                top_k=st.top_k, ensemble=st.ensemble, max_retries=st.max_retries, on_shard=tick,
                meta={"num_classes": data.num_classes, "num_features": data.num_features,
                      "data_fingerprint": data.fingerprint, "mean": data.mean.tolist(), "std": data.std.tolist(),
                      "transfer_rows": data.rows("transfer")
                      if "transfer" in data.y else 0,
                      "teachers": [{"origin": t.origin, "digest": t.digest} for t in teachers]})
        except ShardFailed as exc:
            raise StageFailed("soft targets", str(exc)) from None
        if manifest["reused"]:
            progress.info(f"  reusing {store.uri(key)} (no teacher forward)")
    return manifest


# ---------------------------------------------------------------- student


def student_config(spec: Workflow, manifest: dict[str, Any], storage: Storage) -> dict[str, Any]:
    es = spec.train.early_stopping
    return {
        "label": "student", "model": spec.student.model, "params": spec.student.params,
        "num_features": manifest["num_features"], "num_classes": manifest["num_classes"], "seed": spec.seed,
        "epochs": spec.train.epochs, "batch_size": spec.train.batch_size,
        "optimizer": spec.train.optimizer.model_dump(), "precision": spec.train.precision,
        "loss": {"kind": spec.distill.loss, "temperature": spec.distill.temperature, "alpha": spec.distill.alpha,
                 "beta": spec.distill.beta},
        "data": ShardSource(storage, manifest, "train"),
        "val": ShardSource(storage, manifest, "val") if manifest["splits"]["val"]["rows"] else None,
        "early_stopping": {"metric": es.metric, "patience": es.patience, "direction": es.direction} if es else None,
        "checkpoint_every": spec.train.checkpoint_every, "checkpoint_interval_s": spec.train.checkpoint_interval_s,
    }


def train_student(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_name: str,
                  epoch_hook: Any = None) -> FitResult:
    build_model(spec.student.model, spec.student.params, manifest["num_features"], manifest["num_classes"])
    config = student_config(spec, manifest, storage)
    config["epoch_hook"] = epoch_hook
    return fit(config, workers=spec.train.workers, use_gpu=spec.train.use_gpu,
               cpus_per_worker=spec.train.cpus_per_worker, gpus_per_worker=spec.train.gpus_per_worker,
               storage=storage, run_name=run_name, max_failures=spec.train.max_failures)


def student_model(spec: Workflow, manifest: dict[str, Any], result: FitResult) -> nn.Module:
    model = build_model(spec.student.model, spec.student.params, manifest["num_features"], manifest["num_classes"])
    model.load_state_dict(result.state_dict)
    return model.eval()
