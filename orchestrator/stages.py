"""The data, soft-target and student stages, each with explicit inputs, outputs and cache key.

data -> teachers (teachers.py) -> soft targets -> student(s) -> report and registration (finish.py). The
search lives in search/; pipeline.py runs them in order and builds the result. Every question whose answer
depends on the kind of task goes to the workflow's kind (`spec.kind`).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from orchestrator import progress
from orchestrator.configs import student_fit_config, torch_threads, workers_read_source
from orchestrator.fitting import Slot, run_fit
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher
from tasks.dataset import Dataset
from tasks.errors import ShardFailed, StageFailed, UserError
from tasks.pieces import SourceChanged
from tasks.storage import Storage
from tasks.store.precompute import Encoding, PrecomputeStats, precompute
from tasks.store.store import SoftTargetStore, cache_key
from tasks.train.result import FitResult

# ---------------------------------------------------------------- data


def load_data(spec: Workflow, storage: Storage) -> Dataset:
    kind = spec.kind
    with progress.stage("data", spec.data.source):
        try:
            data = kind.load_workflow_data(spec, storage=storage)
        except UserError as exc:
            raise exc.under("data") from None
        data.where = "data"  # a split read later (only where a stage needs the arrays) names data.source too
        progress.info(f"  {kind.describe(data)}, rows: "
                      + ", ".join(f"{k} {n}" for k, n in data.counts.items()) + f", fingerprint {data.fingerprint[:12]}")
    st = spec.soft_targets
    width = kind.target_width(kind.dims(kind.manifest_meta(data)))
    if st.format == "topk" and st.top_k and st.top_k > width:  # before any teacher work
        raise UserError(f"top_k {st.top_k} is larger than the {width} classes it selects from",
                        where="soft_targets.top_k")
    return data


# ---------------------------------------------------------------- soft targets

# A precompute of at most this many rows runs its shards one after another on the run's warm actor (which
# has torch and the teacher loaded, and the machine's cores); a larger one keeps a Ray task per shard, run
# side by side, where a task's seconds of start-up are small beside its forward and the shards spread
# over a cluster's nodes (docs/architecture.md, docs/soft-targets.md).
WARM_PRECOMPUTE_ROWS = 50_000


def soft_target_key(spec: Workflow, data: Dataset, teachers: list[Teacher]) -> str:
    """Teacher weights x data (rows, split, preprocessing) x format, dtype, top_k or samples, ensemble; never
    temperature."""
    st = spec.soft_targets
    return cache_key([t.digest for t in teachers], data.fingerprint, st.format, st.dtype, st.kept, st.ensemble)


def compute_soft_targets(spec: Workflow, data: Dataset, teachers: list[Teacher],
                         storage: Storage, warm: Slot | None = None) -> tuple[dict[str, Any], PrecomputeStats]:
    """The store entry's manifest for (teachers x data x format), computed only when missing (on `warm`, the
    run's warm actor, when the job is small; else by Ray tasks), and what this run did to get it."""
    st, kind = spec.soft_targets, spec.kind
    key = soft_target_key(spec, data, teachers)
    store = SoftTargetStore(storage)
    with progress.stage("soft targets", f"{st.format}/{st.dtype} key {key}"):
        # a Parquet source's rows are read by the shard tasks, when they can open the source
        splits = data.precompute_rows(spec.seed, from_source=workers_read_source(data))

        def tick(split: str, i: int, n: int, reused: bool) -> None:
            progress.info(f"  shard {split} {i + 1}/{n} {'(already written)' if reused else 'written'}")

        runner = None
        if warm is not None and sum(len(y) for _, y in splits.values()) <= WARM_PRECOMPUTE_ROWS:
            # the fits' thread rule (Resources.threads): the machine's cores on a local run, else its CPUs
            threads = torch_threads(spec.train) or max(1, int(spec.train.cpus_per_worker))
            runner = functools.partial(warm.shard, threads=threads)
        meta = {"task": kind.name, "data_fingerprint": data.fingerprint,
                "teachers": [{"origin": t.origin, "digest": t.digest} for t in teachers], **kind.manifest_meta(data)}
        try:
            manifest, stats = precompute(
                store, key, [t.model for t in teachers], splits,
                encoding=Encoding(kind, st.format, st.dtype, st.kept, st.ensemble), shards=st.shards,
                width=kind.target_width(kind.dims(meta)), meta=meta, max_retries=st.max_retries, on_shard=tick,
                runner=runner)
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
    cfg.kind.build_model(cfg.model, cfg.params, cfg.dims)  # a bad student exits 2 here, not on a worker
    return run_fit(cfg, storage, run_name, slot=warm).result


def student_model(spec: Workflow, manifest: dict[str, Any], result: FitResult) -> nn.Module:
    kind = spec.kind
    model = kind.build_model(spec.student.model, spec.student.params, kind.dims(manifest))
    model.load_state_dict(result.state_dict)
    return model.eval()
