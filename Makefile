# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

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

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/student_throughput.py

clean:
	rm -rf $(VENV) kd-demo
