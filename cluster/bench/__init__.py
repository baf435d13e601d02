"""`kd bench`: where the time and memory go, measured side by side in one run.

The suite lives in `cluster/` (not in the top-level `benchmarks/` folder) because `kd` is an
installed entry point and `benchmarks/` is not an installed package: `cluster` is, and imports
flow cluster → student_trainer → teacher_service, which is what every section needs.

Sections (each writes `Record`s, see `records`):
- `students`: samples/s, peak memory and teacher-seconds of one student by teacher mode;
- `pool`: teacher embeddings/s against batch size and replicas, Serve overhead against a direct
  in-process forward, wire bytes per sample;
- `multi`: several runs on one pool (per-run and total samples/s, reuse, fairness);
- `cache`: embedding cache read rates against the live teacher, bytes per sample per view;
- `scale`: a labelled model (not a measurement) of teacher GPUs per student GPU at real sizes.
"""
