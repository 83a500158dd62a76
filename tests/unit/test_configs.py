"""orchestrator/configs.py: a fit's configuration comes from the workflow alone, frozen."""

from __future__ import annotations

import dataclasses
import os

import pytest

from orchestrator.configs import student_fit_config
from orchestrator.spec import validate
from tasks.storage import Storage
from tasks.train.config import FitConfig, LossConfig, OptimizerConfig, Resources
from tests.helpers import workflow

MANIFEST = {"key": "k", "num_features": 64, "num_classes": 10,
            "splits": {"train": {"rows": 100, "shards": []}, "val": {"rows": 0, "shards": []},
                       "test": {"rows": 20, "shards": []}}}


def test_fit_config_has_no_defaults_of_its_own() -> None:
    for cls in (FitConfig, LossConfig, OptimizerConfig, Resources):
        defaulted = [f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaulted, (cls.__name__, defaulted)


def test_student_config_takes_the_spec_defaults_and_values(tmp_path: object) -> None:
    spec = validate(workflow(**{"distill.beta": 0.25, "train.cpus_per_worker": 2.5,
                                               "train.optimizer": {"name": "adamw"}}))
    cfg = student_fit_config(spec, MANIFEST, Storage(str(tmp_path)), epoch_hook=None)
    assert cfg.optimizer.lr == spec.train.optimizer.lr == 3e-3  # the spec's default, not the loop's old 1e-3
    assert cfg.loss == LossConfig(kind=spec.distill.loss, temperature=spec.distill.temperature,
                                  alpha=spec.distill.alpha, beta=0.25)
    assert cfg.checkpoint_interval_s == spec.train.checkpoint_interval_s
    assert cfg.dims == {"num_features": 64, "num_classes": 10}
    assert cfg.val is None  # no validation rows in the manifest
    assert cfg.resources.threads == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


def test_torch_threads_follow_the_machine_unless_set(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.configs import machine_cores
    from orchestrator.search.space import apply

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert machine_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr("orchestrator.configs.machine_cores", lambda: 8)  # the rule, on any machine

    def threads(concurrent: int = 1, **overrides: object) -> int:
        spec = validate(workflow(**overrides))
        return student_fit_config(spec, MANIFEST, Storage(str(tmp_path)), None, concurrent).resources.threads

    assert threads() == 8  # one local worker, cpus_per_worker unset: every core, as plain PyTorch
    assert threads(**{"train.workers": 2}) == 4 and threads(2, **{"train.workers": 2}) == 2  # shared
    assert threads(16) == 1  # never below one
    assert threads(**{"train.cpus_per_worker": 1}) == 1 and threads(**{"train.cpus_per_worker": 3}) == 3  # explicit
    # a search trial's workflow keeps cpus_per_worker unset (apply re-validates only what was set)
    spec = validate(workflow(search={"trials": 2, "space": {
        "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9}}}))
    trial = apply(spec, {"distill.alpha": 0.5})
    assert trial.distill.alpha == 0.5 and trial.student == spec.student
    assert student_fit_config(trial, MANIFEST, Storage(str(tmp_path)), None, 2).resources.threads == 4
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # on a cluster a node's cores are not this machine's
    assert threads() == 1
