"""Measurement, kept apart from the product: `kd bench`'s suite (`suite`), the soak load (`soak`), the
distillation-methods comparison (`methods`), the GPU check (`gpu_check`, `gpu_wheels`) and two probes
of a one-machine benchmark (`neighbour_cost`, `core_usage`). Each script runs as
`python benchmarks/<name>.py` from the repository root (the GPU check as `python -m benchmarks.gpu_check`);
the product packages never import from here, except the thin `kd bench` entry (`cluster/cli/bench.py`),
which imports `suite` when it runs. Readings and notes: README.md beside this file.
"""
