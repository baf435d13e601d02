"""Regenerate `teacher_pb2.py` / `teacher_pb2_grpc.py` from `teacher.proto` with grpcio-tools.

The .proto is compiled relative to the repository root so the generated modules import each other
as `teacher_service.grpc.proto.teacher_pb2` (a flat `import teacher_pb2` would break inside the
package). protoc writes to a temporary directory; each stub then goes atomically into place
(`write_atomic`).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from teacher_service.atomic_files import write_atomic

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parents[2]
PROTO = PROTO_DIR / "teacher.proto"
REL_PROTO = PROTO.relative_to(ROOT).as_posix()
STUBS = ("teacher_pb2.py", "teacher_pb2_grpc.py")


def protoc(*args: str) -> None:
    """Run grpc_tools' bundled protoc with the repo root on the include path; raise on failure."""
    from grpc_tools import protoc as _protoc

    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    code = _protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", *args, REL_PROTO])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}) on {PROTO}")


def generate(out_root: str | os.PathLike | None = None) -> list[Path]:
    """Write the stubs under `out_root`/teacher_service/grpc/proto (default: in place); return their paths."""
    with tempfile.TemporaryDirectory() as tmp:
        protoc(f"--python_out={tmp}", f"--grpc_python_out={tmp}")
        built = Path(tmp) / PROTO_DIR.relative_to(ROOT)
        dest = Path(out_root) / PROTO_DIR.relative_to(ROOT) if out_root else PROTO_DIR
        return [write_atomic(dest / name, (built / name).read_bytes()) for name in STUBS]


def descriptor_set(out_file: str | os.PathLike) -> None:
    """Write the compiled FileDescriptorSet of teacher.proto (what the stubs must embed)."""
    protoc(f"--descriptor_set_out={out_file}")


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else None):
        print(f"wrote {path}")
