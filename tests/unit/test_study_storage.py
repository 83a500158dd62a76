"""An Optuna sqlite study's store is created once even when searches start together on a fresh root."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

OPEN_AT = """
import sys, time
import optuna
from orchestrator.search.study import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
at = float(sys.argv[1])
while time.time() < at:
    pass
optuna.create_study(study_name=sys.argv[2], storage=open_storage(sys.argv[3]), load_if_exists=True)
"""


def test_searches_starting_together_on_a_fresh_root_both_create_their_study(tmp_path: Path) -> None:
    # without the lock beside optuna.db, one of three processes failed here creating the same tables
    url = f"sqlite:///{tmp_path / 'fresh' / 'optuna.db'}"
    at = str(time.time() + 5)  # every process imported optuna by then: the opens start together
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, at, f"study-{i}", url], stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    import optuna

    from orchestrator.search.study import open_storage

    assert sorted(s.study_name for s in optuna.get_all_study_summaries(open_storage(url))) == [
        "study-0", "study-1", "study-2"]
