"""Causal LMs' test-split report: the perplexities of the teacher, the KD student and, with `distill.baseline`,
the same student trained on next-token CE alone (a `Variant` the driver trains by the same loop on the same
rows with `loss` None, so the only difference from the KD student is the teacher term)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.evaluation import split_metrics
from tasks.kinds.base import Finished, Report, TaskKind, Variant
from tasks.kinds.causal_lm.spec import CausalLMDistill
from tasks.kinds.causal_lm.targets import TeacherEnsemble
from tasks.models import num_params

BASELINE = "baseline"


def variants(distill: CausalLMDistill) -> list[Variant]:
    return [Variant(BASELINE, "the student without KD", loss=None)] if distill.baseline else []


def report(kind: TaskKind, done: Finished) -> Report:
    # one pass over the test shards, one shard in memory at a time (the split can outgrow the driver)
    models = {"student": done.student, "teacher": TeacherEnsemble(done.teachers, done.teacher_rule), **done.variants}
    m = split_metrics(kind, models, done.manifest, done.storage, without_targets=("teacher",))
    s, t, baseline = m["student"], m["teacher"], m.get(BASELINE)
    seq_len = int(kind.dims(done.manifest)["seq_len"])
    student: dict[str, Any] = {
        "perplexity": s["perplexity"], "test_loss": s["loss"], "test_accuracy": s["accuracy"],
        "teacher_agreement": s["agreement"], "perplexity_ratio": s["perplexity"] / t["perplexity"],
        "tokens_per_s": done.fit.samples_per_s * seq_len}
    if baseline is not None:
        student["baseline_perplexity"] = baseline["perplexity"]
        student["baseline_agreement"] = baseline["agreement"]
        gap = baseline["perplexity"] - t["perplexity"]
        student["gap_closed"] = (baseline["perplexity"] - s["perplexity"]) / gap if gap > 0 else 0.0
    teacher = {"perplexity": t["perplexity"], "test_loss": t["loss"], "test_accuracy": t["accuracy"]}
    metrics = {"perplexity": student["perplexity"], "teacher_perplexity": teacher["perplexity"],
               "perplexity_ratio": student["perplexity_ratio"], "teacher_agreement": student["teacher_agreement"],
               "tokens_per_s": student["tokens_per_s"]}
    if baseline is not None:
        metrics["baseline_perplexity"] = student["baseline_perplexity"]
    line = (f"  perplexity: teacher {teacher['perplexity']:.3f}, student {student['perplexity']:.3f}"
            + (f", baseline (no KD) {student['baseline_perplexity']:.3f}" if baseline is not None else "")
            + f" ({num_params(done.student):,} params, {student['tokens_per_s']:,.0f} tokens/s)")
    return Report(student=student, teacher=teacher, metrics=metrics,
                  gate_values={"teacher_perplexity": teacher["perplexity"]}, line=line)


def summary_table(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    share = student["num_params"] / teacher["num_params"] if teacher.get("num_params") else 0.0
    rows = [["teacher", f"{teacher['perplexity']:.3f}", f"{teacher['num_params']:,}", "", "", ""],
            ["student (KD)", f"{student['perplexity']:.3f}", f"{student['num_params']:,}", f"{share:.1%}",
             f"{student['teacher_agreement']:.3f}", f"{student['tokens_per_s']:,.0f}"]]
    if "baseline_perplexity" in student:
        rows.append(["student (no KD)", f"{student['baseline_perplexity']:.3f}", f"{student['num_params']:,}",
                     f"{share:.1%}", f"{student['baseline_agreement']:.3f}", ""])
    return ["", "test perplexity", "params", "share of teacher", "top-1 agreement", "tokens/s"], rows
