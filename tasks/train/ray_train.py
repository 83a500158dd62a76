"""A fit as a Ray Train run: `train.workers` data-parallel workers (gloo on CPU, NCCL on GPU), each running
the one loop (tasks/train/loop.py), checkpoints in the storage's checkpoints/ folder."""

from __future__ import annotations

import os

from tasks.layout import checkpoints_path
from tasks.storage import Storage, load_torch
from tasks.train.config import FitConfig
from tasks.train.loop import train_loop
from tasks.train.result import FitResult, fit_result
from tasks.train.sessions import STATE


def fit(cfg: FitConfig, *, storage: Storage, run_name: str) -> FitResult:
    """Train with Ray Train (`cfg.resources.workers` data-parallel workers; gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    run_config = RunConfig(
        name=run_name,
        storage_path=checkpoints_path(storage),
        storage_filesystem=storage.pyarrow_fs() if storage.is_s3 else None,
        failure_config=FailureConfig(max_failures=res.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_loop, train_loop_config={"fit": cfg},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=resources,
                                     placement_strategy=res.placement.upper()),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = load_torch(os.path.join(d, STATE), f"checkpoint of {run_name}")
    return fit_result(saved, result.metrics or {}, res.workers)
