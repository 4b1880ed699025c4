# The newcomer's two commands: `make demo` and `make test`. Both build .venv when it is missing.
# The bench extra (transformers) is installed too: the benchmark's equivalence test uses it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo serve bench bench-serve clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-build-isolation -e ".[bench]"
	touch $(STAMP)

# Everything (CI's).
test: $(STAMP)
	$(PY) -m pytest -q tests

# The quick tier: tests that start no process (no torchrun, no Java scorer, no demo) and train briefly.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PY) -m llama_caption demo

# The caption server on the newest `make demo` run: http://127.0.0.1:8000 (ARGS="--port 8080" for more flags).
serve: $(STAMP)
	$(PY) -m llama_caption.tools.demo.serve $(ARGS)

bench-serve: $(STAMP)
	$(PY) -m llama_caption bench-serve

bench: $(STAMP)
	$(PY) -m llama_caption bench

clean:
	rm -rf $(VENV) .pytest_cache demo_runs
