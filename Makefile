# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv first).
# `make bench` runs the benchmark suite (BENCH_PRESET=smoke|cpu|gpu, default cpu) into benchmarks/results.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_PRESET ?= cpu
BENCH_ARGS ?=

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade --quiet pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kd demo --workdir kd-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra tests

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/kd bench --preset $(BENCH_PRESET) --out benchmarks/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) kd-demo
