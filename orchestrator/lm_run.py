"""The driver-side end of a causal-LM workflow: test-split perplexities (teacher, KD student and, with
`distill.baseline`, the same student trained on next-token CE alone) and the result's sections.

The baseline is trained by the same loop (tasks/train.py) on the same stored rows with `loss` None, so
the only difference from the KD student is the teacher term.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator import progress, stages
from orchestrator.configs import student_fit_config, task_for
from orchestrator.evaluation import split_metrics
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher
from tasks.kinds import TaskKind
from tasks.models import model_bytes, num_params
from tasks.storage import Storage
from tasks.train import FitResult, fit


class TeacherEnsemble(nn.Module):
    """The teacher(s) as one module giving the ensembled logits the soft targets were made from."""

    def __init__(self, task: TaskKind, teachers: list[nn.Module], rule: str) -> None:
        super().__init__()
        self.task, self.teachers, self.rule = task, nn.ModuleList(teachers), rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task.teacher_outputs(list(self.teachers), x.numpy(), self.rule)


def train_baseline(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_id: str) -> tuple[nn.Module, FitResult]:
    """The chosen student trained on hard labels only (same rows, steps, schedule and seed as the KD one)."""
    cfg = dataclasses.replace(student_fit_config(spec, manifest, storage, None), loss=None, log_prefix="baseline")
    result = fit(cfg, storage=storage, run_name=f"baseline-{run_id}")
    return stages.student_model(spec, manifest, result), result


def finish_lm(spec: Workflow, chosen: Workflow, data: Any, fit_result: FitResult, teachers: list[Teacher],
              manifest: dict[str, Any], storage: Storage, run_id: str, source: str | None,
              search_summary: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    import mlflow

    from orchestrator.pipeline import log_history

    task = task_for(spec)
    dims = task.dims(manifest)
    baseline = None
    if chosen.distill.baseline:
        with progress.stage("baseline", f"{chosen.student.model} {chosen.student.params} without KD"):
            base_model, base_fit = train_baseline(chosen, manifest, storage, run_id)
            log_history(base_fit.history, prefix="baseline_")
    with progress.stage("evaluate", "test split"):
        model = stages.student_model(chosen, manifest, fit_result)
        models = {"student": model, "teacher": TeacherEnsemble(task, [t.model for t in teachers],
                                                               spec.soft_targets.ensemble)}
        if chosen.distill.baseline:
            models["baseline"] = base_model
        # one pass over the test shards, one shard in memory at a time (the split can outgrow the driver)
        m = split_metrics(task, models, manifest, storage, without_targets=("teacher",))
        s, t, baseline = m["student"], m["teacher"], m.get("baseline")
    seq_len = int(dims["seq_len"])
    student: dict[str, Any] = {
        "perplexity": s["perplexity"], "test_loss": s["loss"], "test_accuracy": s["accuracy"],
        "teacher_agreement": s["agreement"], "perplexity_ratio": s["perplexity"] / t["perplexity"],
        "num_params": num_params(model), "model_bytes": model_bytes(model),
        "tokens_per_s": fit_result.samples_per_s * seq_len, "samples_per_s": fit_result.samples_per_s,
        "epochs": len(fit_result.history), "stop_reason": fit_result.stop_reason.value,
        "resumed_from": fit_result.resumed_from, "nodes": fit_result.nodes,
    }
    if baseline is not None:
        student["baseline_perplexity"] = baseline["perplexity"]
        student["baseline_agreement"] = baseline["agreement"]
        gap = baseline["perplexity"] - t["perplexity"]
        student["gap_closed"] = (baseline["perplexity"] - s["perplexity"]) / gap if gap > 0 else 0.0
    teacher = {"perplexity": t["perplexity"], "test_loss": t["loss"], "test_accuracy": t["accuracy"],
               "num_params": sum(num_params(x.model) for x in teachers), "trained": any(x.trained for x in teachers),
               "count": len(teachers)}
    mlflow.log_metrics({k: float(v) for k, v in {
        "perplexity": student["perplexity"], "teacher_perplexity": teacher["perplexity"],
        "baseline_perplexity": student.get("baseline_perplexity"), "perplexity_ratio": student["perplexity_ratio"],
        "teacher_agreement": student["teacher_agreement"], "tokens_per_s": student["tokens_per_s"],
        "num_params": student["num_params"]}.items() if v is not None})
    progress.info(f"  perplexity: teacher {teacher['perplexity']:.3f}, student {student['perplexity']:.3f}"
                  + (f", baseline (no KD) {student['baseline_perplexity']:.3f}" if baseline is not None else "")
                  + f" ({student['num_params']:,} params, {student['tokens_per_s']:,.0f} tokens/s)")
    with progress.stage("register", spec.registered_model):
        registration = register_lm(spec, chosen, model, data, student, teacher, teachers, manifest, storage, run_id,
                                   source, search_summary)
    return student, teacher, registration


def register_lm(spec: Workflow, chosen: Workflow, model: nn.Module, data: Any, student: dict[str, Any],
                teacher: dict[str, Any], teachers: list[Teacher], manifest: dict[str, Any], storage: Storage,
                run_id: str, source: str | None, search_summary: dict[str, Any] | None) -> dict[str, Any]:
    """The student with its tokenizer (transformers directory, safetensors) as a pyfunc that generates text,
    registered and gated like a classifier (gates on perplexity, perplexity_ratio, num_params, ...)."""
    from orchestrator.pipeline import lineage_tags
    from orchestrator.registry import PIP_REQUIREMENTS, lineage_extras, register
    from tasks.served_lm import log_lm_pyfunc

    model_uri = log_lm_pyfunc(model, data.extra["tokenizer"],
                              pip_requirements=[*PIP_REQUIREMENTS, "transformers", "tokenizers"])
    lineage = lineage_tags(spec, chosen, manifest, storage, teachers, search_summary)
    lineage.update(lineage_extras(chosen, source, teachers))
    lineage["kdflow.tokenizer"] = str(manifest.get("tokenizer_hash"))
    return register(chosen, model_uri, run_id, {**student, "teacher_perplexity": teacher["perplexity"]}, manifest,
                    storage, lineage)


def bytes_per_token(manifest: dict[str, Any]) -> float | None:
    """Stored bytes (Parquet, zstd, all columns) per token position of the store entry."""
    if not manifest.get("seq_len"):
        return None
    return float(np.round(manifest["bytes"] / max(1, manifest["rows"] * int(manifest["seq_len"])), 2))
