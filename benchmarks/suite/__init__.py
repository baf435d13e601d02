"""`kd bench`: where the time and memory go, measured side by side in one run.

Measurement lives apart from the product: `kd bench` (`cluster/cli/bench.py`) only parses its
arguments and imports this package when it runs; `run.run_suite` is what it calls. The package
is installed with the product (pyproject's packages), and imports flow one way: benchmarks →
cluster → student_trainer → teacher_service, never back.

Sections (each writes `Record`s, see `records`):
- `students`: samples/s, peak memory and teacher-seconds of one student by teacher mode;
- `pool`: teacher embeddings/s against batch size and replicas, Serve overhead against a direct
  in-process forward, wire bytes per sample;
- `multi`: several runs on one pool (per-run and total samples/s, reuse, fairness);
- `cache`: embedding cache read rates against the live teacher, bytes per sample per view;
- `scale`: a labelled model (not a measurement) of teacher GPUs per student GPU at real sizes.
"""
