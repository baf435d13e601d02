"""`python -m cluster.cli` (how `kd sweep` and submitted jobs start `kd`)."""
import sys

from cluster.cli.main import main

sys.exit(main())
