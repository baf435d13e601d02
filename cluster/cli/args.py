"""Argument pieces every `kd` command shares: one wording per flag, one parser per value type.

Each command module registers its own subparser; what two commands have in common (the cluster
address, the teacher's model flags, JSON and NAME=WEIGHT values, printing a result) lives here once.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

ADDRESS_HELP = {
    "embedded": "Ray cluster address (e.g. 'auto' or ray://host:10001). Default: $RAY_ADDRESS, else an "
                "embedded local cluster that lives as long as this command",
    "running": "Ray cluster address of the running cluster (default: auto)",
    "jobs": "job server (dashboard) address, default $RAY_ADDRESS if http, else http://127.0.0.1:8265",
}


def add_address(p: argparse.ArgumentParser, kind: str = "embedded") -> None:
    """``--address``: ``embedded`` (a command that may start its own cluster), ``running`` (one that
    talks to a cluster already up) or ``jobs`` (Ray's job server)."""
    p.add_argument("--address", help=ADDRESS_HELP[kind])


VERBOSE_HELP = ("also show what Ray logs at INFO: Ray Train's per-report metric lines, the workers' per-step "
                "lines and model messages, Serve's access log; without it, one progress line per run, "
                "warnings and errors (the rest stays in Ray's log files, /tmp/ray/session_latest/logs)")


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v/--verbose``: one wording for every command that runs Ray work and is quiet by default."""
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)


def add_app_names(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--app-name``, repeatable: one teacher app, or several (an ensemble's pools) in order."""
    p.add_argument("--app-name", dest="app_name", action="append", metavar="APP",
                   help=f"{help_text} (repeat for several teachers: --app-name a --app-name b)")


class _DeprecatedAlias(argparse.Action):
    """A flag's former name: hidden from --help, sets the flag's value, and says once which name to use."""

    def __init__(self, option_strings: list[str], dest: str, new_name: str, **kwargs: Any) -> None:
        self.new_name = new_name
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"kd: warning: {option_string} is deprecated, use {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser, old_name: str, new_name: str, **kwargs: Any) -> None:
    """``old_name`` keeps working as ``new_name`` (the dest argparse gives it; ``kwargs`` as in its
    add_argument, e.g. ``type``), printing one deprecation line when used."""
    dest = new_name.lstrip("-").replace("-", "_")
    p.add_argument(old_name, dest=dest, action=_DeprecatedAlias, new_name=new_name, **kwargs)


def json_arg(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def weight_arg(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME=WEIGHT`` (a loss and its weight)."""
    name, sep, weight = text.partition("=")
    try:
        return name.strip(), float(weight) if sep else 1.0
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--loss {text!r}: expected NAME or NAME=WEIGHT") from exc


def positive_seconds(text: str) -> float:
    """``--watch`` seconds: a positive number."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


# the open_clip model flags, in one wording for `teacher serve`, `precompute` and `cache audit`
MODEL_FLAGS = ("model", "pretrained", "overrides", "precision")


def add_teacher_model_args(p) -> None:
    """``--model --pretrained --overrides --precision`` on a parser or argument group."""
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-L-14")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--overrides", type=json_arg, help="JSON of open_clip create_model overrides")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="teacher precision")


def given(args: argparse.Namespace, names) -> dict[str, Any]:
    """The flags among ``names`` the user gave (not None)."""
    return {n: getattr(args, n, None) for n in names if getattr(args, n, None) is not None}


def teacher_config(path: Optional[str], updates: dict[str, Any]):
    """TeacherConfig from a YAML file (or the defaults) with ``updates`` on top, validated once; a
    section's fields are dotted (``serving.num_replicas``, ``grpc.port``: `TeacherConfig.updated`)."""
    from teacher_service.config import TeacherConfig

    base = TeacherConfig.from_yaml(path) if path else TeacherConfig()
    return base.updated(updates)


def print_result(payload: dict, as_json: bool) -> None:
    """A command's result: JSON, or one ``key: value`` line per field."""
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        for key, value in payload.items():
            print(f"{key}: {value}")


def print_per_teacher(results: dict[str, dict], as_json: bool) -> None:
    """One result per teacher (keyed by fingerprint): a single one as :func:`print_result` prints it,
    several as one JSON object keyed by fingerprint, or one block per teacher."""
    if len(results) == 1:
        print_result(next(iter(results.values())), as_json)
    elif as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for i, (fingerprint, result) in enumerate(results.items()):
            print(f"{chr(10) if i else ''}== teacher {fingerprint}")
            print_result(result, False)
