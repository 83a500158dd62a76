# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (constraints.txt), so nothing pulls a multi-GB CUDA wheel
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt torch
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# the empty MLflow store new stores are copied from (its migrations take seconds), in ~/.cache/kdflow
	$(VENV)/bin/python -m orchestrator.tracking
	touch $(STAMP)

demo: $(STAMP)
	cd $(CURDIR) && $(VENV)/bin/kdflow run workflows/digits.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator tasks tests benchmarks

clean:
	rm -rf $(VENV) .kdflow
