# Two commands on a fresh machine:  `make demo` (the default job) and `make test` (the test suite).
# Both create .venv, install squeeze and fetch the offline assets first (idempotent: seconds when done).
PY := .venv/bin/python
STAMP := .venv/.squeeze-installed

.PHONY: demo test test-slow preset assets setup clean

demo: assets
	$(PY) train.py

test: assets
	$(PY) -m pytest

test-slow: assets
	$(PY) -m pytest -m slow

# A table preset end to end: make preset NAME=gpt2_compression_offline (conf/experiment/<NAME>.yaml)
preset: assets
	@test -n "$(NAME)" || (echo "give NAME=<a conf/experiment preset>, e.g. NAME=pruning_rates_offline"; exit 2)
	$(PY) train.py -m experiment=$(NAME)
	$(PY) -m squeeze.report multirun/$(NAME)

assets: setup
	$(PY) -m squeeze.assets fetch

setup: $(STAMP)

# torch first and pinned: it comes from a local CPU wheel here; a bare `torch` would pull CUDA builds.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf .venv outputs multirun
