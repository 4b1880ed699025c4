# The newcomer's two commands: `make demo` and `make test`. Both build .venv when it is missing:
# the demo, the server and the benchmarks need requirements.txt and the package; the tests (and
# `make bench`, whose reference is transformers) add the `test` extra (pytest, playwright,
# transformers). pip skips byte-compiling (--no-compile: most of torch is never imported);
# tools/precompile then writes the bytecode of what the commands import, once (15 s), even where
# PYTHONDONTWRITEBYTECODE is set, which would otherwise make every process compile torch again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test test test-fast demo serve bench bench-serve clean

install: $(STAMP)
install-test: $(TEST_STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-build-isolation --no-deps -e .
	$(PY) -m llama_caption.tools.precompile
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-compile --no-build-isolation -e ".[test]"
	touch $(TEST_STAMP)

# Everything (CI's), in TEST_WORKERS pytest-xdist processes sharing the cores (one thread each;
# the session's stand-ins are made once for all of them: tests/conftest.py `shared`). Two on a
# 2-core machine take the suite from about 7 to under 6 minutes; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=10 tests

# The quick tier: tests that start no process (no torchrun, no Java scorer, no demo) and train briefly.
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=10 -m "not slow" tests

demo: $(STAMP)
	$(PY) -m llama_caption demo

# The caption server on the newest `make demo` run: http://127.0.0.1:8000 (ARGS="--port 8080" for more flags).
serve: $(STAMP)
	$(PY) -m llama_caption.tools.demo.serve $(ARGS)

bench-serve: $(STAMP)
	$(PY) -m llama_caption bench-serve

bench: $(TEST_STAMP)
	$(PY) -m llama_caption bench

clean:
	rm -rf $(VENV) .pytest_cache demo_runs
