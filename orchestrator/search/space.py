"""search.space: its parameters as Optuna suggestions, a trial's values applied to the workflow, and the
up-front check that every value builds a student."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.spec import CategoricalParam, FloatParam, IntParam, Workflow, set_dotted
from tasks.errors import UserError

PRIMITIVE = (type(None), bool, int, float, str)  # what Optuna's CategoricalDistribution can hold


class Space:
    """search.space as Optuna suggestions. Non-primitive choices (lists such as [32, 16]) travel as JSON."""

    def __init__(self, space: dict[str, Any]) -> None:
        self.space = space

    def suggest(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, p in self.space.items():
            if isinstance(p, FloatParam):
                values[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
            elif isinstance(p, IntParam):
                values[key] = trial.suggest_int(key, p.low, p.high, log=p.log, step=p.step)
            else:
                values[key] = self.decode(key, trial.suggest_categorical(key, self.encoded(p)))
        return values

    @staticmethod
    def encoded(p: CategoricalParam) -> list[Any]:
        if all(isinstance(c, PRIMITIVE) for c in p.choices):
            return list(p.choices)
        return [json.dumps(c, sort_keys=True) for c in p.choices]

    def decode(self, key: str, value: Any) -> Any:
        p = self.space.get(key)
        if not isinstance(p, CategoricalParam) or all(isinstance(c, PRIMITIVE) for c in p.choices):
            return value
        return json.loads(value)

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """A finished trial's params as workflow values."""
        return {k: self.decode(k, v) for k, v in params.items()}


def apply(spec: Workflow, values: dict[str, Any]) -> Workflow:
    """The workflow with a trial's values set at their dotted keys, validated again.

    Only the keys the workflow set are carried over, so that what it left to a default (such as
    `train.cpus_per_worker`, whose absence shares the machine's cores) stays unset in the trial too."""
    raw = spec.model_dump(mode="json", exclude_unset=True)
    for key, value in values.items():
        set_dotted(raw, key, value)
    return type(spec).model_validate(raw)


def check_space(spec: Workflow, manifest: dict[str, Any]) -> None:
    """Build the student at both ends of every range and for every choice: a bad value exits 2 up front."""
    assert spec.search is not None
    kind = spec.kind
    for key, p in spec.search.space.items():
        if not key.startswith("student."):
            continue
        for sample in (p.choices if isinstance(p, CategoricalParam) else [p.low, p.high]):
            s = apply(spec, {key: sample})
            try:
                kind.build_model(s.student.model, s.student.params, kind.dims(manifest))
            except UserError as exc:
                raise UserError(f"value {sample!r}: {exc}", where=f"search.space.{key}") from None
    if not manifest["splits"]["val"]["rows"] and any(o.metric.startswith("val_") for o in spec.search.objectives):
        raise UserError("a val_* objective needs a validation split (data.split.val > 0)", where="search.objectives")
