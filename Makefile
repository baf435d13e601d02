# Two entry points for a fresh machine: `make demo` and `make test` (each creates .venv first).
# `make test` is the whole suite (what CI runs: .ci/run) and prints its 15 slowest tests;
# `make test-quick` leaves out the tests marked `ray` (they start Ray) or `slow` (training, several
# processes): the edit-test cycle, a few minutes on 2 cores.
# `make bench` runs the benchmark suite (`kd bench`, code in benchmarks/suite; BENCH_PRESET=smoke|cpu|gpu, default cpu)
# into benchmarks/results.
# `make reliability` reruns the fault and limit tests whose figures docs/reliability.md quotes and
# writes those figures to benchmarks/results/reliability/*.json (one pytest per file: one Ray cluster at a time).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_PRESET ?= cpu
BENCH_ARGS ?=

RELIABILITY_TESTS = \
	tests/test_cache.py::test_appender_killed_mid_write_leaves_only_whole_files \
	tests/test_precompute.py::test_precompute_killed_between_shards_resumes_without_loss_or_duplicates \
	"tests/test_grpc.py::test_ingress_listens_on_loopback_only tests/test_grpc.py::test_a_flooding_caller_is_refused_while_a_light_caller_is_answered" \
	tests/test_grpc_tls.py::test_health_over_the_real_tls_ingress_follows_the_app \
	tests/test_faults.py \
	tests/test_soak.py

.PHONY: venv demo test test-quick bench reliability clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade --quiet pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kd demo --workdir kd-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra --durations=15 tests

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra -m "not ray and not slow" tests

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/kd bench --preset $(BENCH_PRESET) --out benchmarks/results $(BENCH_ARGS)

reliability: $(STAMP)
	for tests in $(RELIABILITY_TESTS); do \
	  KD_RELIABILITY_OUT=benchmarks/results/reliability $(VENV)/bin/python -m pytest -q -s $$tests || exit 1; \
	done

clean:
	rm -rf $(VENV) kd-demo
