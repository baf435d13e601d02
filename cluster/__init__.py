"""cluster: running the system on Ray: the `kd` command (`cli`), the embedded local cluster, the demo,
several runs on one pool (`sweep`), Ray job submission, node roles and runs' reports. Measurement
(`kd bench`'s suite, the soak load) lives apart, in the top-level `benchmarks` package."""
