# fedabus developer entry points. Both targets install what they need into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check .

# Two workers, one test file each at a time: module-scoped process fixtures stay on one worker, and every
# simulation has its own SuperLink ports (shared/simulation.py), so the process tests can run side by side.
test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30

# The main job: a simulated 3-site federation on synthetic data with local MLflow (see docs/operations.md).
demo: install
	$(VENV)/bin/fedabus demo --out $(HOME)/.fedabus/demo --fresh
