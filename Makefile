# Everything a fresh machine needs, from python3 and make alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision are installed as a pair built for each other.  This pair is also setup.cfg's floor for
# both (torch>=2.14.1, torchvision>=0.29.1): no older pair has been tested, so none is promised.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-signals test-floors bench clean install lint

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# the digits pipeline (pipelines/digits.toml); seeded random weights by default, since a fresh machine may be
# offline: `make demo DEMO_WEIGHTS=imagenet` for pretrained features
DEMO_WEIGHTS ?= random
demo: install
	$(VENV)/bin/featx run pipelines/digits.toml --weights $(DEMO_WEIGHTS)

test: install
	$(PY) -m pytest -q -m "not slow" -n 2

# the tests marked slow: real torchrun processes, a PostgreSQL server, the signal stress test, the digits pipeline
# as shipped, the divergence matrix; CI runs them after `make test` (.ci/run)
test-slow: install
	$(PY) -m pytest -q -m slow -n 2

# the signal tests ROUNDS times in a row, stopping at the first failure: a test that passes only when a signal
# lands at a lucky moment fails here sooner or later; about 40 s a round on 2 quiet cores
ROUNDS ?= 30
test-signals: install
	for i in $$(seq $(ROUNDS)); do echo "round $$i"; $(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not slow" \
	  tests/test_signals.py tests/test_search.py::test_ctrl_c_stops_cleanly_keeping_finished_trials \
	  tests/test_extract.py -k "signals or ctrl_c or interrupted or stop_while" || exit 1; done

# ruff (style and likely bugs) and mypy (types) over the package, its tests and the benchmarks
lint: install
	$(VENV)/bin/ruff check featx tests benchmarks
	$(VENV)/bin/mypy featx tests

# the fast suite with every dependency at its floor in setup.cfg (`name>=X` installed as `name==X`, .ci/floors.py),
# in a venv of its own, FLOORS_VENV: proof that the floors are real.  The test tools (pytest, ruff, mypy) are left
# to pip.  The first run installs the old releases (a few minutes); then it takes as long as `make test`.
FLOORS_VENV ?= .venv-floors
test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -m pytest -q -m "not slow" -n 2

$(FLOORS_VENV)/.installed: setup.cfg pyproject.toml .ci/floors.py
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/python .ci/floors.py setup.cfg > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/constraints.txt -e '.[dev]'
	touch $@

bench: install
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_fit.py
	$(PY) benchmarks/bench_integrity.py

clean:
	rm -rf $(VENV) $(FLOORS_VENV) build *.egg-info
