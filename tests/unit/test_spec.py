"""The workflow spec: the reference format is accepted as written; every bad input names its YAML path."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from orchestrator.spec import (
    CategoricalParam,
    FloatParam,
    Gate,
    IntParam,
    load_workflow,
    parse_overrides,
    validate,
    workflow_class,
    workflow_schema,
)
from tasks.errors import UserError
from tasks.kinds import kind_for, kinds
from tests.helpers import workflow, write_workflow

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "workflow-reference.yaml"


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as exc:
        validate(raw)
    return str(exc.value)


def reference_documents() -> list[dict]:
    """docs/workflow-reference.yaml: one workflow per kind of task, the first showing every shared key."""
    return list(yaml.safe_load_all(REFERENCE.read_text()))


def test_reference_workflow_is_accepted_as_written() -> None:
    first, *others = [validate(doc, source=str(REFERENCE)) for doc in reference_documents()]
    assert first.name == "digits-distill" and first.task == "classification"
    assert first.search is not None and first.search.space["student.params.hidden"].choices == [[16], [32], [64]]
    assert first.registry.promote.gates.num_params == "<= 20000"
    assert first.train.early_stopping.patience == 5
    assert {first.task, *(o.task for o in others)} == set(kinds()), "a document per kind of task"


def _model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key a pydantic model accepts, nested models included (a list of models: its items)."""
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"  # what a workflow file spells (distill.on_policy.lambda)
        keys.add(key)
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    keys |= _model_keys(inner, f"{key}.")
    return keys


def _yaml_keys(node: object, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(f"{prefix}{k}")
            keys |= _yaml_keys(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for item in node:
            keys |= _yaml_keys(item, prefix)
    return keys


@pytest.mark.parametrize("task", sorted(kinds()))
def test_reference_names_every_key_the_workflow_accepts(task: str) -> None:
    """A key a kind's workflow accepts without a line in docs/workflow-reference.yaml, in its kind's document or
    (a key every kind shares) in the first one, fails here."""
    docs = reference_documents()
    first, own = docs[0], next(d for d in docs if d.get("task", "classification") == task)
    have = _yaml_keys(own) | _yaml_keys(first)
    # search.space maps dotted workflow keys to parameters: compare the parameters' own keys
    have |= {f"search.space.{k}" for param in first["search"]["space"].values() for k in param}
    expected = _model_keys(workflow_class(kind_for(task)))
    for param in (FloatParam, IntParam, CategoricalParam):
        expected |= {f"search.space.{k}" for k in _model_keys(param)}
    missing = sorted(k for k in expected if k not in have and not k.startswith(("teacher.params.", "student.params.")))
    assert not missing, f"docs/workflow-reference.yaml lacks {missing} for task {task}"


def test_json_schema_checks_workflow_files() -> None:
    """The workflow's JSON Schema (`kdflow schema`) accepts the reference and the examples and rejects a typo."""
    schema = json.loads(json.dumps(workflow_schema()))  # as printed
    checker = Draft202012Validator(schema)
    for name, doc in [*((f"reference[{i}]", d) for i, d in enumerate(reference_documents())),
                      *((p.name, yaml.safe_load(p.read_text())) for p in sorted((REPO / "workflows").glob("*.yaml")))]:
        errors = [e.message for e in checker.iter_errors(doc)]
        assert not errors, f"{name}: {errors}"
    typo = reference_documents()[0]
    typo["distill"]["temprature"] = 4
    assert any("temprature" in e.message for e in checker.iter_errors(typo))
    typo = reference_documents()[0]
    typo["soft_targets"]["format"] = "probs"
    assert [list(e.absolute_path) for e in checker.iter_errors(typo)] == [["soft_targets", "format"]]
    # the task selects the branch: a causal_lm key is known there and unknown to classification
    lm = reference_documents()[1]
    assert not list(checker.iter_errors(lm))
    assert any("seq_len" in e.message for e in checker.iter_errors({**lm, "task": "classification"}))


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_example_workflows_validate(path: Path) -> None:
    assert load_workflow(path).name


@pytest.mark.parametrize(("key", "value", "named", "says"), [
    ("distill.temperature", 0, "distill.temperature", "greater than 0"),
    ("distill.temperature", -2.0, "distill.temperature", "greater than 0"),
    ("distill.alpha", 1.5, "distill.alpha", "less than or equal to 1"),
    ("distill.alpha", -0.1, "distill.alpha", "greater than or equal to 0"),
    ("soft_targets.shards", 0, "soft_targets.shards", "greater than or equal to 1"),
    ("train.epochs", -1, "train.epochs", "greater than or equal to 0"),
    ("train.epochs", 0, "train.epochs", "0 trains nothing"),  # 0 only with a stage after the epochs (on-policy)
    ("teacher.train.epochs", 0, "teacher.train.epochs", "greater than or equal to 1"),
    ("train.batch_size", "big", "train.batch_size", "integer"),
    ("distill.loss", "kld", "distill.loss", "unknown loss"),
    ("soft_targets.format", "probs", "soft_targets.format", "'logits', 'topk' or 'sampled'"),
    ("distill.temprature", 4, "distill.temprature", "unknown key"),
    ("studnet", {}, "studnet", "unknown key"),
    ("registry.promote.gates.retention", "about 0.9", "registry.promote.gates.retention", "comparison"),
    ("data.split.test", 1.0, "data.split.test", "less than 1"),
    ("data.split.val", 0.8, "data.split", "at least 10% of the rows"),
])
def test_bad_values_name_their_yaml_path(key: str, value: object, named: str, says: str) -> None:
    message = error_of(workflow(**{key: value}))
    assert named in message and says in message


def test_topk_format_needs_k() -> None:
    assert "top_k" in error_of(workflow(**{"soft_targets.format": "topk"}))


def test_all_errors_are_reported_at_once() -> None:
    message = error_of(workflow(**{"distill.alpha": 2, "train.epochs": -1}))
    assert "distill.alpha" in message and "train.epochs" in message


@pytest.mark.parametrize(("space", "named", "says"), [
    ({"distill.temperatur": {"type": "float", "low": 1, "high": 8}}, "search.space.distill.temperatur", "not a valid"),
    ({"distill.temperature": {"type": "float", "low": 8, "high": 1}}, "search.space", "low (8.0) > high (1.0)"),
    ({"student.params.hidden": {"type": "categorical", "choices": []}}, "search.space", "at least 1 item"),
    ({"distill.alpha": {"type": "float", "low": 0.5, "high": 2.0}}, "search.space.distill.alpha", "not a valid"),
    ({"teacher.params.hidden": {"type": "categorical", "choices": [[8]]}}, "search.space.teacher.params.hidden",
     "only student, distill and train"),
])
def test_bad_search_space_names_the_key(space: dict, named: str, says: str) -> None:
    message = error_of(workflow(search={"trials": 2, "space": space}))
    assert named in message and says in message


def test_unknown_sampler_names_the_key() -> None:
    message = error_of(workflow(search={"trials": 2, "sampler": "grid",
                                        "space": {"distill.alpha": {"type": "float", "low": 0, "high": 1}}}))
    assert "search.sampler" in message


def test_set_values_are_parsed_as_yaml() -> None:
    parsed = dict(parse_overrides(["a.b=8", "student.params={hidden: [64]}", "search=null", "x=[1, 2]", "s=abc"]))
    assert parsed == {"a.b": 8, "student.params": {"hidden": [64]}, "search": None, "x": [1, 2], "s": "abc"}


def test_set_overrides_apply_and_validate(tmp_path: Path) -> None:
    path = write_workflow(tmp_path, search={"trials": 2, "space": {
        "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9}}})
    spec = load_workflow(path, ["distill.temperature=8", "student.params={hidden: [64, 32]}", "search=null"])
    assert spec.distill.temperature == 8.0
    assert spec.student.params == {"hidden": [64, 32]}
    assert spec.search is None
    with pytest.raises(UserError, match="distill.alpha"):
        load_workflow(path, ["distill.alpha=3"])
    with pytest.raises(UserError, match="--set"):
        load_workflow(path, ["distill.alpha"])


def test_set_value_that_is_not_yaml_is_taken_as_text(tmp_path: Path) -> None:
    assert dict(parse_overrides(["registry.promote.gates.retention=>= 0.9"])) == {
        "registry.promote.gates.retention": ">= 0.9"}
    path = write_workflow(tmp_path, **{"registry.promote": {"alias": "champion"}})
    spec = load_workflow(path, ["registry.promote.gates.retention=>= 0.9", "registry.promote.gates.latency_ms=< 5"])
    assert spec.registry.promote.gates.comparisons() == {"retention": ">= 0.9", "latency_ms": "< 5"}


def test_gates_on_any_recorded_metric_and_the_old_forms() -> None:
    gates = {"retention": 0.9, "num_params": "<= 20000", "model_bytes": "<= 5000", "teacher_agreement": "> 0.8",
             "test_accuracy": ">= 0.95", "beats_alias": "champion"}
    spec = validate(workflow(**{"registry.promote": {"gates": gates}}))
    rules = spec.registry.promote.gates.comparisons()
    assert rules == {"retention": ">= 0.9", "num_params": "<= 20000", "model_bytes": "<= 5000",
                     "teacher_agreement": "> 0.8", "test_accuracy": ">= 0.95"}
    assert spec.registry.promote.gates.beats_alias == "champion"
    assert rules["model_bytes"].holds(4000) and not rules["model_bytes"].holds(6000)
    message = error_of(workflow(**{"registry.promote.gates.acuracy": ">= 0.9"}))
    assert "registry.promote.gates" in message and "'acuracy'" in message and "test_accuracy" in message
    message = error_of(workflow(**{"registry.promote.gates.model_bytes": "small"}))
    assert "registry.promote.gates.model_bytes" in message and "comparison" in message


def test_every_shipped_workflow_is_valid() -> None:
    for path in sorted((REPO / "workflows").glob("*.yaml")):
        spec = load_workflow(path)
        if spec.registry.promote:
            assert spec.registry.promote.gates.comparisons(), path


def test_gates_compare() -> None:
    assert Gate(">= 0.95").holds(0.96) and not Gate(">= 0.95").holds(0.9)
    assert Gate("<= 20000").holds(20000) and not Gate("< 20000").holds(20000)
