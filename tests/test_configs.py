"""orchestrator/configs.py: a fit's configuration comes from the workflow alone, frozen."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.configs import student_fit_config
from orchestrator.spec import Workflow
from tasks.fit_config import FitConfig, LossConfig, OptimizerConfig, Resources
from tasks.storage import Storage
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
    spec = Workflow.model_validate(workflow(**{"distill.beta": 0.25, "train.cpus_per_worker": 2.5,
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
