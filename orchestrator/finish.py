"""The end of a run: the students the kind compares with (its variants), its test-split report of the chosen
student, the report's metrics on the run, and the student registered with its lineage behind the gates.

What differs between kinds (which metrics, which variants, what the served model takes) the kind answers;
what is the same for every kind (a student's size, throughput and epochs, the teachers' count, the MLflow
calls, the registry) is here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from orchestrator import progress, stages
from orchestrator.configs import student_fit_config
from orchestrator.fitting import Slot, run_fit
from orchestrator.registry import PIP_REQUIREMENTS, lineage_extras, register
from orchestrator.spec import Workflow
from orchestrator.teachers import Teacher
from orchestrator.tracking import log_history
from tasks.dataset import Dataset
from tasks.kinds.base import Finished, Report
from tasks.models import model_bytes, num_params
from tasks.storage import Storage
from tasks.store.store import SoftTargetStore
from tasks.train.result import FitResult


@dataclasses.dataclass
class Chosen:
    """The run's student: its workflow (a search's chosen trial's), its fit and its search summary."""

    spec: Workflow
    fit: FitResult
    search: dict[str, Any] | None


def train_variants(chosen: Workflow, manifest: dict[str, Any], storage: Storage, run_id: str,
                   slot: Slot | None) -> dict[str, nn.Module]:
    """The kind's variants of the chosen student: the same rows, steps, schedule and seed, another objective;
    each a stage of its own, its epochs logged under its name."""
    out = {}
    for v in chosen.kind.variants(chosen.distill):
        with progress.stage(v.name, f"{chosen.student.model} {chosen.student.params} {v.detail}"):
            cfg = dataclasses.replace(student_fit_config(chosen, manifest, storage, None), loss=v.loss,
                                      log_prefix=v.name)
            if cfg.after_epochs is not None:  # a variant is the offline objective alone: no stage after the epochs
                cfg = dataclasses.replace(cfg, after_epochs=None, online_teacher=None)
            result = run_fit(cfg, storage, f"{v.name}-{run_id}", slot=slot).result
            log_history(result.history, prefix=f"{v.name}_")
            out[v.name] = stages.student_model(chosen, manifest, result)
    return out


def sections(report: Report, model: nn.Module, fit: FitResult, teachers: list[Teacher]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result's student and teacher sections: the kind's report, and what every kind records."""
    student = {**report.student, "num_params": num_params(model), "model_bytes": model_bytes(model),
               "samples_per_s": fit.samples_per_s, "epochs": len(fit.history), "stop_reason": fit.stop_reason.value,
               "resumed_from": fit.resumed_from, "nodes": fit.nodes}
    teacher = {**report.teacher, "num_params": sum(num_params(t.model) for t in teachers),
               "trained": any(t.trained for t in teachers), "count": len(teachers)}
    return student, teacher


def finish(spec: Workflow, chosen: Chosen, data: Dataset, teachers: list[Teacher], manifest: dict[str, Any],
           storage: Storage, run_id: str, source: str | None, slot: Slot | None
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Variants, the test-split report, its metrics on the run, and the registered version."""
    import mlflow

    kind, student_spec = spec.kind, chosen.spec
    variants = train_variants(student_spec, manifest, storage, run_id, slot)
    with progress.stage("evaluate", "test split"):
        model = stages.student_model(student_spec, manifest, chosen.fit)
        report = kind.report(Finished(student=model, fit=chosen.fit, teachers=[t.model for t in teachers],
                                      teacher_rule=spec.soft_targets.ensemble, manifest=manifest, storage=storage,
                                      variants=variants))
        student, teacher = sections(report, model, chosen.fit, teachers)
        mlflow.log_metrics({**{k: float(v) for k, v in report.metrics.items()}, "num_params": student["num_params"]})
        progress.info(report.line)
    with progress.stage("register", spec.registered_model):
        # a pickle-free pyfunc that takes what a user has and answers in the user's terms (the kind's)
        model_uri = kind.log_model(model, student_spec.student, data, manifest, PIP_REQUIREMENTS)
        lineage = {**lineage_tags(spec, chosen, manifest, storage, teachers),
                   **lineage_extras(student_spec, source, teachers), **kind.lineage(manifest)}
        registration = register(student_spec, model_uri, run_id, {**student, **report.gate_values}, manifest,
                                storage, lineage)
    return student, teacher, registration


def lineage_tags(spec: Workflow, chosen: Chosen, manifest: dict[str, Any], storage: Storage,
                 teachers: list[Teacher]) -> dict[str, str]:
    """Where the registered student came from: workflow, kind, soft targets, data, teachers, student, trial."""
    c = chosen.spec
    lineage = {"kdflow.workflow": spec.name, "kdflow.task": spec.task, "kdflow.soft_targets.key": manifest["key"],
               "kdflow.soft_targets.uri": SoftTargetStore(storage).uri(manifest["key"]),
               "kdflow.data_fingerprint": manifest["data_fingerprint"],
               "kdflow.teachers": ",".join(t.digest[:16] for t in teachers),
               "kdflow.student": f"{c.student.model} {c.student.params}",
               "kdflow.distill": f"{c.distill.loss} T={c.distill.temperature} alpha={c.distill.alpha}"}
    if chosen.search:
        lineage["kdflow.search.study"] = chosen.search["study"]
        lineage["kdflow.search.trial"] = str(chosen.search["best_trial"])
    return lineage
