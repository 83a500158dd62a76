"""What the `kdflow` command prints for a person: each kind's closing summary table and progress line, and a
submitted job's result line found in its logs."""

from __future__ import annotations

from tasks.kinds import kind_for


def test_run_summary_reads_as_words_and_aligned_numbers() -> None:
    import io

    from orchestrator.registry_cli import print_summary

    result = {
        "workflow": "digits-distill", "task": "classification", "status": "succeeded", "seconds": 81.2,
        "teacher": {"test_accuracy": 0.98148, "num_params": 85002, "count": 1},
        "student": {"test_accuracy": 0.95926, "num_params": 2410, "retention": 0.97736, "latency_ms": 0.0312,
                    "epochs": 24, "stop_reason": "early_stopped", "samples_per_s": 15537.2, "resumed_from": None},
        "soft_targets": {"reused": True, "rows": 1797, "format": "logits", "dtype": "float16", "bytes": 188831,
                         "uri": "/tmp/x/.kdflow/soft_targets/ff7b"},
        "search": None, "stages": {"data": 2.1, "teacher": 0.7, "student": 48.8, "register": 3.7},
        "registry": {"model": "digits-student", "version": 2, "aliases": ["challenger"], "gates": {
            "num_params": {"gate": "num_params", "rule": "num_params <= 2000", "value": 2410, "passed": False}}},
        "mlflow": {"tracking_uri": "sqlite:////elsewhere/.kdflow/mlflow.db", "experiment": "digits-distill",
                   "run_id": "e1da"},
    }
    out = io.StringIO()
    print_summary(out, result)
    text = out.getvalue()
    assert "{" not in text  # no JSON blobs
    lines = text.splitlines()
    teacher, student = next(x for x in lines if x.startswith("teacher")), next(x for x in lines if x.startswith("student "))
    assert "0.9815" in teacher and "85,002" in teacher and "0.9593" in student and "2.8%" in student
    assert teacher.index("0.9815") + 6 == student.index("0.9593") + 6  # numbers right-aligned in one column
    assert "student 48.8 s" in text and "digits-student v2 (@challenger)" in text
    assert "not promoted: gate num_params failed" in text
    assert "kdflow ui --root /elsewhere/.kdflow" in text


def test_run_summary_shows_the_perplexity_table() -> None:
    import io

    from orchestrator.registry_cli import print_summary

    result = {
        "workflow": "lm-stdlib", "task": "causal_lm", "status": "succeeded", "seconds": 500.0,
        "teacher": {"perplexity": 9.329, "num_params": 894080, "count": 1},
        "student": {"perplexity": 11.424, "baseline_perplexity": 12.142, "num_params": 127296,
                    "teacher_agreement": 0.597, "baseline_agreement": 0.566, "tokens_per_s": 5593.0, "epochs": 8,
                    "stop_reason": "completed", "samples_per_s": 43.7, "resumed_from": None},
        "soft_targets": {"reused": False, "rows": 2053, "format": "topk", "dtype": "float16", "bytes": 23119896,
                         "uri": "/tmp/x/.kdflow/soft_targets/7c2c"},
        "search": None, "stages": {"teacher": 60.0}, "registry": None,
        "mlflow": {"tracking_uri": "sqlite:////x/.kdflow/mlflow.db", "experiment": "lm-stdlib", "run_id": "a7"},
    }
    out = io.StringIO()
    print_summary(out, result)
    lines = out.getvalue().splitlines()
    row = {name: next(x for x in lines if x.startswith(name)) for name in ("teacher", "student (KD)",
                                                                         "student (no KD)")}
    assert "9.329" in row["teacher"] and "11.424" in row["student (KD)"] and "12.142" in row["student (no KD)"]
    assert "14.2%" in row["student (KD)"] and "5,593" in row["student (KD)"] and "0.566" in row["student (no KD)"]
    assert any(x.startswith("student ") and "8 epochs" in x and "5,593 tokens/s" in x for x in lines), lines


def test_progress_line_reads_perplexity_and_tokens_for_an_lm() -> None:
    metrics = {"train_loss": 2.5, "val_loss": 2.2, "val_perplexity": 9.025, "val_accuracy": 0.41, "samples_per_s": 40.0}
    assert kind_for("causal_lm").epoch_summary(metrics, {"seq_len": 128, "vocab_size": 320}) == \
        "loss 2.5000 val_ppl 9.025 5,120 tokens/s"
    classifier = {"train_loss": 0.3, "val_accuracy": 0.95, "samples_per_s": 1234.0}
    assert kind_for("classification").epoch_summary(classifier, {"num_features": 64, "num_classes": 10}) == \
        "loss 0.3000 val_acc 0.9500 1,234 samples/s"


def test_the_result_is_found_even_when_ray_logs_after_it() -> None:
    from orchestrator.jobs import result_line

    result = '{"workflow": "w", "status": "succeeded"}'
    logs = f"progress\n{result}\n(raylet) node 1a2b died\n{{not json}}\n"
    assert result_line(logs) == result
    assert result_line("no result here\n{\"other\": 1}\n") is None
