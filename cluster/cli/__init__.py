"""The `kd` command: one module per command group, shared flags in `args`, the parser in `main`."""
from cluster.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
