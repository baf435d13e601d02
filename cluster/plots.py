"""One matplotlib setup for every `kd` command that draws PNGs (`kd report`, `kd demo`, `kd sweep`,
`kd bench`), so the backend, resolution and atomic writes are decided once."""
from __future__ import annotations

import io
from pathlib import Path

from teacher_service.atomic_files import write_atomic

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend: the commands run on headless nodes and in CI, never on a
    display. Raises ImportError without matplotlib (callers then say the plots were skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Render `fig` to PNG bytes, close it and write the file atomically (a reader never sees half a
    picture, and a long report does not keep every figure in memory)."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
