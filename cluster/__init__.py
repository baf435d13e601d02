"""cluster: running the system on Ray: the `kd` command (`cli`), the embedded local cluster, the demo,
several runs on one pool (`sweep`), Ray job submission, node roles, the soak load and `bench`."""
