"""Classification's test-split report: the student's accuracy, agreement with the teacher, retention and
latency; the teacher's accuracy read from its stored test-split logits (no teacher forward, on reruns too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tasks.evaluation import latency_ms, stream_metrics
from tasks.kinds.base import Finished, Report, TaskKind
from tasks.models import num_params
from tasks.storage import Storage
from tasks.store.store import SoftTargetStore


def teacher_test_accuracy(kind: TaskKind, manifest: dict[str, Any], storage: Storage) -> float:
    """From the stored test-split logits, shard by shard (correct predictions and positions summed)."""
    dims = kind.dims(manifest)
    correct = total = 0
    for test in SoftTargetStore(storage).batches(manifest, "test"):
        pred = kind.decode_targets(test.targets, dims).argmax(-1)
        correct += int((pred == test.y).sum())
        total += test.y.numel()
    return correct / total if total else 0.0


def report(kind: TaskKind, done: Finished) -> Report:
    m = stream_metrics(kind, done.student, done.manifest, done.storage)
    teacher_acc = teacher_test_accuracy(kind, done.manifest, done.storage)
    student = {"test_accuracy": m["accuracy"], "teacher_agreement": m["agreement"],
               "latency_ms": latency_ms(done.student, torch.randn(1, int(done.manifest["num_features"]))),
               "retention": m["accuracy"] / teacher_acc if teacher_acc else 0.0}
    line = (f"  teacher {teacher_acc:.4f}, student {student['test_accuracy']:.4f} "
            f"(retention {student['retention']:.3f}, {num_params(done.student)} params)")
    return Report(student=student, teacher={"test_accuracy": teacher_acc},
                  metrics={"test_accuracy": student["test_accuracy"], "retention": student["retention"],
                           "teacher_test_accuracy": teacher_acc, "latency_ms": student["latency_ms"],
                           "teacher_agreement": student["teacher_agreement"]},
                  gate_values={"teacher_test_accuracy": teacher_acc}, line=line)


def summary_table(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    share = student["num_params"] / teacher["num_params"] if teacher.get("num_params") else 0.0
    rows = [["teacher" + (f" x{teacher['count']}" if teacher.get("count", 1) > 1 else ""),
             f"{teacher['test_accuracy']:.4f}", f"{teacher['num_params']:,}", "", "", ""],
            ["student", f"{student['test_accuracy']:.4f}", f"{student['num_params']:,}", f"{share:.1%}",
             f"{student['retention']:.3f}", f"{student['latency_ms']:.3f}"]]
    return ["", "test accuracy", "params", "share of teacher", "retention", "latency ms"], rows
