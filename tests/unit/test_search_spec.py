"""The search without Ray: selection rules, study storage, samplers and pruners, the pruning monitor against
Optuna's own answers, and bad search specs naming their key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.search.selection import Candidate, pareto_front, select_trial
from orchestrator.spec import SelectRule, validate
from tests.helpers import SPACE, workflow, write_workflow


def test_pareto_front_and_the_select_rules() -> None:
    objectives = [("val_accuracy", "maximize"), ("num_params", "minimize")]
    cands = [Candidate(0, {"val_accuracy": 0.95, "num_params": 5000}),
             Candidate(1, {"val_accuracy": 0.945, "num_params": 1200}),
             Candidate(2, {"val_accuracy": 0.90, "num_params": 300}),
             Candidate(3, {"val_accuracy": 0.93, "num_params": 5000}),  # dominated by 0
             Candidate(4, {"val_accuracy": 0.94, "num_params": 1300})]  # dominated by 1
    assert [c.number for c in pareto_front(cands, objectives)] == [0, 1, 2]
    assert select_trial(cands, objectives, "best").number == 0
    assert select_trial(cands, objectives, "smallest within 0.01 of best").number == 1  # 0.945 >= 0.95 - 0.01
    assert select_trial(cands, objectives, "smallest within 0.05 of best val_accuracy").number == 2
    assert select_trial(cands, objectives, "smallest within 0 of best").number == 0
    one = [("val_loss", "minimize")]
    losses = [Candidate(0, {"val_loss": 0.3, "num_params": 10}), Candidate(1, {"val_loss": 0.2, "num_params": 99}),
              Candidate(2, {"val_loss": 0.21, "num_params": 50})]
    assert select_trial(losses, one, "best").number == 1
    assert select_trial(losses, one, "smallest within 0.02 of best").number == 2
    with pytest.raises(ValueError, match="not an objective"):
        rule = "smallest within 0.01 of best val_loss"
        SelectRule.parse(rule).check(rule, [m for m, _ in objectives])


def test_study_storage_defaults_to_sqlite_under_the_root_and_takes_journal_files(tmp_path: Path) -> None:
    from optuna.storages import JournalStorage, RDBStorage

    from orchestrator.search.study import display_url, open_storage, storage_url
    from orchestrator.workspace import storage_for

    def spec(storage: str | None) -> Any:
        return validate(workflow(**{"storage.root": str(tmp_path / "root"),
                                    "search": {"trials": 2, "storage": storage, "space": SPACE}}))

    url = storage_url(spec(None), storage_for(spec(None)))
    assert url == f"sqlite:///{tmp_path / 'root' / 'optuna.db'}"
    assert isinstance(open_storage(url), RDBStorage)
    journal = storage_url(spec(str(tmp_path / "study.log")), storage_for(spec(None)))
    assert journal == f"journal://{tmp_path / 'study.log'}" and isinstance(open_storage(journal), JournalStorage)
    assert storage_url(spec("journal:///mnt/nfs/s.jnl"), storage_for(spec(None))) == "journal:///mnt/nfs/s.jnl"
    assert display_url("postgresql://kd:secret@db:5432/optuna") == "postgresql://kd:***@db:5432/optuna"


@pytest.mark.parametrize("pruner", ["none", "median", "asha", "hyperband"])
@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "nsga2"])
def test_every_sampler_and_pruner_searches_the_space_with_list_choices(sampler: str, pruner: str) -> None:
    import optuna

    from orchestrator.search.space import Space
    from orchestrator.search.study import make_pruner, make_sampler

    search = validate(workflow(search={"trials": 8, "concurrency": 2, "sampler": sampler, "pruner": pruner,
                                       "space": SPACE})).search
    study = optuna.create_study(direction="maximize", sampler=make_sampler(search, 0), pruner=make_pruner(search, 4))
    space = Space(search.space)
    seen: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        seen.append(values)
        score = values["distill.alpha"] * values["student.params.hidden"][0]
        for epoch in range(1, 5):
            trial.report(score * epoch / 4, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return score

    study.optimize(objective, n_trials=8)
    assert len(study.trials) == 8 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert all(v["student.params.hidden"] in ([8], [16], [32]) for v in seen)  # lists, not JSON strings
    assert all(1.0 <= v["distill.temperature"] <= 10.0 for v in seen)
    assert space.values(study.best_trial.params) == seen[study.best_trial.number]


@pytest.mark.parametrize("pruner", ["median", "asha", "hyperband"])
def test_the_monitor_prunes_exactly_as_optuna_does_on_the_stored_study(tmp_path: Path, pruner: str) -> None:
    import random

    import optuna
    from optuna.trial import TrialState

    from orchestrator.search.study import TrialMonitor, make_pruner

    # two trials at a time, epochs interleaved: the reference asks Optuna's own should_prune on a sqlite study
    # (as kdflow did before the in-memory monitor); the other study goes through the monitor as a search does
    # (open, begin, report per epoch, end before the tell, settle after). Both must take the same decision at
    # every epoch, and end with the same stored values and pruner attributes. Curves: some learn, some do not.
    search = validate(workflow(search={"trials": 12, "concurrency": 2, "pruner": pruner, "space": SPACE})).search
    epochs = 12
    # one study name in two files: Hyperband picks a trial's bracket from the study name and trial number
    ref = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/ref.db", direction="maximize",
                              pruner=make_pruner(search, epochs))
    url = f"sqlite:///{tmp_path}/mon.db"
    mon = optuna.create_study(study_name="s", storage=url, direction="maximize", pruner=make_pruner(search, epochs))
    # a resumed search: two trials already stored before the monitor opens
    for study in (ref, mon):
        for k, state in enumerate((TrialState.COMPLETE, TrialState.PRUNED)):
            t = study.ask()
            for e in range(1, 5 if k else epochs + 1):
                t.report(0.5 + 0.01 * e - 0.2 * k, e)
            study.tell(t, 0.62 if not k else None, state=state)
    monitor = TrialMonitor()
    monitor.open(url, "s", ["maximize"], make_pruner(search, epochs), "val_accuracy", mon.get_trials(deepcopy=False))
    rng = random.Random(7)
    curves = [[min(0.99, rng.uniform(0.1, 0.9) * (1 - 0.7 ** e)) for e in range(1, epochs + 1)] for _ in range(16)]
    running: list[tuple[Any, Any, list[float], int]] = []  # (ref trial, monitored trial, curve, next epoch)
    decisions = []
    pending = list(curves)
    while pending or running:
        while pending and len(running) < 2:
            r, m = ref.ask(), mon.ask()
            assert r.number == m.number
            monitor.begin(m.number, m._trial_id, epochs)
            running.append((r, m, pending.pop(0), 1))
        r, m, curve, e = running.pop(0)
        value = curve[e - 1]
        r.report(value, e)
        expected = e < epochs and r.should_prune()
        got = monitor.report(m.number, e, {"epoch": e, "val_accuracy": value})
        decisions.append((m.number, e, got))
        assert got == expected, (pruner, m.number, e)
        if got or e == epochs:
            state = TrialState.PRUNED if got else TrialState.COMPLETE
            assert [h["epoch"] for h in monitor.end(m.number)] == list(range(1, e + 1))
            ref.tell(r, None if got else max(curve[:e]), state=state)
            mon.tell(m, None if got else max(curve[:e]), state=state)
            done = mon.trials[m.number]
            monitor.settle(m.number, done.state.name, done.values)
        else:
            running.insert(1 if len(running) else 0, (r, m, curve, e + 1))
    assert any(p for *_, p in decisions) and not all(p for *_, p in decisions)  # the pruner did judge
    for a, b in zip(ref.trials, mon.trials, strict=True):
        assert (a.state, a.intermediate_values, a.system_attrs) == (b.state, b.intermediate_values, b.system_attrs)


@pytest.mark.parametrize(("search", "named"), [
    ({"space": {"distill.temprature": {"type": "float", "low": 1, "high": 8}}}, "search.space.distill.temprature"),
    ({"space": {"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.001}}}, "search.space.train.optimizer.lr"),
    ({"space": {"student.params.hidden": {"type": "categorical", "choices": []}}}, "search.space.student.params.hidden"),
    ({"sampler": "grid", "space": SPACE}, "search.sampler"),
    ({"space": {"student.params.widht": {"type": "int", "low": 8, "high": 64}}}, "search.space.student.params.widht"),
    ({"objectives": [{"metric": "val_acc"}], "space": SPACE}, "search.objectives[0].metric"),
    ({"select": "smallest within 0.01 of best val_loss", "space": SPACE}, "val_loss"),
])
def test_bad_search_specs_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 search: dict[str, Any], named: str) -> None:
    from orchestrator.cli import main

    path = write_workflow(tmp_path, search={"trials": 2, **search})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / ".kdflow").exists()  # nothing ran


def test_a_parameter_without_its_type_says_what_to_write() -> None:
    """`{low, high}` without a type is refused with the three types spelled out (not pydantic's
    "Unable to extract tag using discriminator"); `{choices: [...]}` alone is categorical."""
    from tasks.errors import UserError

    with pytest.raises(UserError) as exc:
        validate(workflow(search={"trials": 2, "space": {"distill.alpha": {"low": 0.1, "high": 0.9}}}))
    assert "distill.alpha: needs type: float (with low, high), int (low, high) or categorical (choices)" \
        in str(exc.value) and "discriminator" not in str(exc.value)
    spec = validate(workflow(search={"trials": 2, "space": {"distill.temperature": {"choices": [2, 4]}}}))
    assert spec.search.space["distill.temperature"].type == "categorical"
