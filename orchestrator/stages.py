"""The data, soft-target and student stages, each with explicit inputs, outputs and cache key.

data -> teachers (teachers.py) -> soft targets -> student(s) -> evaluation (evaluation.py). Registration
lives in registry.py and the search in search/; pipeline.py runs them in order and builds the result.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from orchestrator import progress
from orchestrator.configs import student_fit_config, task_for, torch_threads, workers_read_source
from orchestrator.search.pool import Slot, fit_on
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher
from tasks.data import Dataset
from tasks.errors import ShardFailed, StageFailed, UserError
from tasks.pieces import SourceChanged
from tasks.soft_targets import PrecomputeStats, SoftTargetStore, cache_key
from tasks.storage import Storage
from tasks.train import FitResult

# ---------------------------------------------------------------- data


def load_data(spec: Workflow, storage: Storage) -> Dataset:
    d = spec.data
    with progress.stage("data", d.source):
        try:
            data = task_for(spec).load_data(d.model_dump(mode="json"), seed=spec.seed, storage=storage)
        except UserError as exc:
            raise exc.under("data") from None
        data.where = "data"  # a split read later (only where a stage needs the arrays) names data.source too
        meta = data.extra.get("meta", {})
        shape = (f"{meta['seq_len']} tokens per row, vocabulary {meta['vocab_size']} (tokenizer "
                 f"{meta['tokenizer_hash']})" if "seq_len" in meta
                 else f"{data.num_features} features, {data.num_classes} classes")
        progress.info(f"  {shape}, rows: "
                      + ", ".join(f"{k} {n}" for k, n in data.counts.items()) + f", fingerprint {data.fingerprint[:12]}")
    st = spec.soft_targets
    if st.format == "topk" and st.top_k and st.top_k > data.num_classes:  # before any teacher work
        raise UserError(f"top_k {st.top_k} is larger than the {data.num_classes} classes (vocabulary) it selects from",
                        where="soft_targets.top_k")
    return data


# ---------------------------------------------------------------- soft targets

# A precompute of at most this many rows runs its shards one after another on the run's warm actor (which
# has torch and the teacher loaded, and the machine's cores); a larger one keeps a Ray task per shard, run
# side by side, where a task's seconds of start-up are small beside its forward and the shards spread
# over a cluster's nodes (docs/architecture.md, docs/soft-targets.md).
WARM_PRECOMPUTE_ROWS = 50_000


def soft_target_key(spec: Workflow, data: Dataset, teachers: list[Teacher]) -> str:
    """Teacher weights x data (rows, split, preprocessing) x format, dtype, top_k, ensemble; never temperature."""
    st = spec.soft_targets
    return cache_key([t.digest for t in teachers], data.fingerprint, st.format, st.dtype, st.top_k, st.ensemble)


def compute_soft_targets(spec: Workflow, data: Dataset, teachers: list[Teacher],
                 storage: Storage, warm: Slot | None = None) -> tuple[dict[str, Any], PrecomputeStats]:
    """The store entry's manifest for (teachers x data x format), computed only when missing (on `warm`, the
    run's warm actor, when the job is small; else by Ray tasks), and what this run did to get it."""
    st = spec.soft_targets
    key = soft_target_key(spec, data, teachers)
    store = SoftTargetStore(storage)
    with progress.stage("soft targets", f"{st.format}/{st.dtype} key {key}"):
        # a Parquet source's rows are read by the shard tasks, when they can open it
        splits = data.precompute_rows(spec.seed, from_source=workers_read_source(data))

        def tick(split: str, i: int, n: int, reused: bool) -> None:
            progress.info(f"  shard {split} {i + 1}/{n} {'(already written)' if reused else 'written'}")

        runner = None
        if warm is not None and sum(len(y) for _, y in splits.values()) <= WARM_PRECOMPUTE_ROWS:
            # the fits' thread rule (Resources.threads): the machine's cores on a local run, else its CPUs
            threads = torch_threads(spec) or max(1, int(spec.train.cpus_per_worker))
            runner = functools.partial(warm.shard, threads=threads)
        try:
            manifest, stats = store.precompute(
                key, [t.model for t in teachers], splits, task=task_for(spec), shards=st.shards, format=st.format, dtype=st.dtype,
                top_k=st.top_k, ensemble=st.ensemble, max_retries=st.max_retries, on_shard=tick, runner=runner,
                meta={"num_classes": data.num_classes, "num_features": data.num_features,
                      "data_fingerprint": data.fingerprint, "mean": data.mean.tolist(), "std": data.std.tolist(),
                      "transfer_rows": data.counts.get("transfer", 0),
                      "teachers": [{"origin": t.origin, "digest": t.digest} for t in teachers],
                      **data.extra.get("meta", {})})
        except ShardFailed as exc:
            raise StageFailed("soft targets", str(exc)) from None
        except SourceChanged as exc:  # a shard task read a piece that is not what the data stage reduced
            raise exc.under("data") from None
        if stats.reused:
            progress.info(f"  reusing {store.uri(key)} (no teacher forward)")
    return manifest, stats


# ---------------------------------------------------------------- student


def train_student(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_name: str,
                  epoch_hook: Any = None, warm: Slot | None = None) -> FitResult:
    """The student as the spec describes it: on `warm` (the run's warm actor) when single-worker on CPUs,
    else a Ray Train run."""
    cfg = student_fit_config(spec, manifest, storage, epoch_hook)
    cfg.task.build_model(cfg.model, cfg.params, cfg.dims)  # a bad student exits 2 here, not on a worker
    return fit_on(warm, cfg, storage, run_name)


def student_model(spec: Workflow, manifest: dict[str, Any], result: FitResult) -> nn.Module:
    task = task_for(spec)
    model = task.build_model(spec.student.model, spec.student.params, task.dims(manifest))
    model.load_state_dict(result.state_dict)
    return model.eval()
