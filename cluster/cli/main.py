"""The `kd` parser and entry point: each command module registers its own subcommand."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.cli import bench, cache, data, demo, export, report, submit, sweep, teacher, train

COMMANDS = (data, teacher, train, export, demo, sweep, report, cache, submit, bench)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="kd", formatter_class=fmt,
        description="CLIP knowledge distillation on Ray: a frozen open_clip teacher served by Ray Serve "
                    "feeds students trained with Ray Train.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, fmt)
    return parser


# the project's own errors that mean bad input: (module, class)
PROJECT_USER_ERRORS = (("teacher_service.app", "TeacherUnavailableError"), ("teacher_service.cache", "CacheError"),
                       ("cluster.auth", "ClusterAuthError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or configuration: one `kd: error:` line, no traceback. The project's
    own are taken from their modules only when those are loaded (one that is not raised nothing), so
    a configuration refused before Ray starts is reported without importing Ray and Serve."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError]
    for module, name in PROJECT_USER_ERRORS:
        error = getattr(sys.modules.get(module), name, None)
        if error is not None:
            errors.append(error)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as exc:
        print(f"kd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
