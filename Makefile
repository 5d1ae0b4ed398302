# Two commands for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; override for a GPU machine, e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0
# The versions the suite last passed with (pip constraints); pyproject.toml keeps the ranges.
LOCK   := constraints.txt
LATEST := .venv-latest

.PHONY: install quickstart test test-fast test-latest lock bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

# Pretrain the quickstart model on the built-in corpus (< 5 min on 2 CPU cores; samples are shown as
# it learns), then generate with it. Replaces an earlier quickstart run.
quickstart: install
	$(BIN)/llmkit pretrain pretrain-zh-tiny --overwrite
	$(BIN)/llmkit generate --prompt "昨天天气很" --max-new-tokens 40 --seed 1

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The suite against the newest release of every dependency (torch stays at $(TORCH)), in a venv of its
# own: drift is seen on purpose, not by surprise. Once it passes, `make lock` moves the lock to those versions.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet "$(TORCH)"
	$(LATEST)/bin/pip install --quiet -e ".[test,bench]"
	$(LATEST)/bin/python -m pytest -q
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt  # only once the suite passed

lock: $(LATEST)/versions.txt
	{ sed -n '1,2p' $(LOCK); sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' $<; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

bench: install $(VENV)/.installed-bench
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/classify_baselines.py

# The `bench` extra (scikit-learn, for the classic baselines); the tests need none of it.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
