# Two commands for a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch; override for a GPU machine, e.g. `make install TORCH=torch`.
TORCH  ?= torch==2.13.0

.PHONY: install quickstart test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
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

bench: install $(VENV)/.installed-bench
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/classify_baselines.py

# The `bench` extra (scikit-learn, for the classic baselines); the tests need none of it.
$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
