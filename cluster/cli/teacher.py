"""`kd teacher serve|status|stop`: the teacher pool (a named, detached Serve app)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Optional, TextIO

from teacher_service.config import ANSWER_DTYPES

from cluster.cli.args import (add_address, add_app_names, add_teacher_model_args, given, json_arg,
                              positive_seconds, teacher_config)

# flag (argparse dest) -> the TeacherConfig field it sets, dotted for a section's
SERVE_FLAGS = {"model": "model", "pretrained": "pretrained", "overrides": "overrides", "precision": "precision",
               "app_name": "serving.app_name", "replicas": "serving.num_replicas", "num_cpus": "serving.num_cpus",
               "num_gpus": "serving.num_gpus", "max_batch_size": "serving.max_batch_size",
               "autoscale": "serving.autoscaling", "grpc_port": "grpc.port", "grpc_host": "grpc.host",
               "grpc_token_file": "grpc.token_file", "grpc_tls_cert": "grpc.tls_cert_file",
               "grpc_tls_key": "grpc.tls_key_file", "grpc_tls_client_ca": "grpc.tls_client_ca_file",
               "grpc_insecure": "grpc.insecure", "grpc_health_port": "grpc.health_port",
               "answer_dtype": "serving.answer_dtype"}


def teacher_config_from_args(args: argparse.Namespace):
    """The TeacherConfig `kd teacher serve` deploys: --config YAML with the flags on top."""
    updates = {SERVE_FLAGS[flag]: value for flag, value in given(args, SERVE_FLAGS).items()}
    if args.replicas is not None and getattr(args, "autoscale", None) is None:
        updates["serving.autoscaling"] = None  # --replicas asks for a fixed pool, also over a config that autoscales
    if getattr(args, "shard_root", None):  # replicas do not run in this directory
        updates["serving.shard_roots"] = [os.path.abspath(os.path.expanduser(root)) for root in args.shard_root]
    if getattr(args, "role_placement", False):
        from cluster.roles import teacher_placement

        updates.update({f"serving.{name}": value for name, value in teacher_placement().items()})
    return teacher_config(getattr(args, "config", None), updates)


def cmd_teacher_serve(args: argparse.Namespace) -> int:
    cfg = teacher_config_from_args(args)  # a bad config fails here, before Ray and Serve are even imported
    from cluster.local import init_ray
    from teacher_service.app import delete_teacher, deploy

    print(init_ray(args.address))
    handle = deploy(cfg)  # with grpc.port: also the app's gRPC ingress, on this node
    info = handle.info.remote().result(timeout_s=600)
    print(f"teacher app {cfg.serving.app_name!r} is serving {info.get('model')} "
          f"(embed_dim {info.get('embed_dim')}, fingerprint {info.get('fingerprint')})")
    if cfg.grpc.port is not None:
        print(grpc_banner(cfg))
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    if args.block or embedded:
        if embedded:
            print("the embedded cluster lives only as long as this command: keeping it up. "
                  "To deploy and return, start a cluster (`ray start --head`) and pass --address auto")
        print("serving; Ctrl-C stops this command and the app with it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            delete_teacher(cfg.serving.app_name)
    return 0


def grpc_banner(cfg) -> str:
    """Where the gRPC ingress listens and who can reach it."""
    from teacher_service.grpc.ingress import ingress_addresses

    addresses = ingress_addresses(cfg.serving.app_name) or {}
    options = cfg.grpc
    reach = "this machine only" if options.is_loopback() else "every host that can reach this address"
    token = "bearer token required" if options.token_file else "no token required"
    tls = ("mutual TLS" if options.tls_client_ca_file else "TLS") if options.tls_enabled() else "plaintext"
    health = f"; grpc.health.v1 alone, plaintext, on {addresses['health']}" if addresses.get("health") else ""
    return (f"gRPC: TeacherService (Embed/Stats/Health) and grpc.health.v1 on {addresses.get('grpc')} "
            f"({reach}; {tls}; {token}){health}; "
            f"per caller at most {options.caller_max_in_flight or 'unlimited'} in flight, "
            f"{options.caller_samples_per_s or 'unlimited'} samples/s")


def cmd_teacher_status(args: argparse.Namespace) -> int:
    from cluster.local import init_ray
    from teacher_service.app import collect_stats, get_teacher_handle
    from teacher_service.stats import format_stats

    init_ray(args.address or "auto", quiet=True)
    apps = args.app_name or ["kd-teacher"]
    handles = {app: get_teacher_handle(app, timeout_s=30) for app in apps}  # an ensemble's run uses several

    def render() -> str:
        pools = {}
        for app, handle in handles.items():  # each pool, in the order given
            info = handle.info.remote().result(timeout_s=args.timeout)
            pools[app] = {"info": info, "stats": collect_stats(handle, timeout_s=args.timeout)}  # replicas merged
        if args.json:
            return json.dumps(pools[apps[0]] if len(apps) == 1 else pools, indent=2, default=str)
        if len(apps) == 1:
            return format_stats(**pools[apps[0]])
        return "\n\n".join(f"== teacher app {app!r}\n{format_stats(**pool)}" for app, pool in pools.items())

    if args.watch is not None:
        return watch(render, args.watch)
    print(render())
    return 0


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen (ANSI)


def watch(render: Callable[[], str], every_s: float, iterations: Optional[int] = None,
          sleep: Callable[[float], None] = time.sleep, out: Optional[TextIO] = None) -> int:
    """Redraw `render()` every `every_s` seconds until Ctrl-C (or `iterations`, which tests pass with
    a `sleep` that does not sleep). A failed refresh (a replica restarting, a timeout) is shown and
    the next one tried: a watch is for watching the pool through such moments."""
    out = out or sys.stdout
    clear = CLEAR if out.isatty() else ""
    done = 0
    try:
        while iterations is None or done < iterations:
            try:
                text = render()
            except Exception as exc:  # noqa: BLE001 - shown to the user, who keeps watching
                text = f"status unavailable: {exc!r}"
            out.write(f"{clear}{time.strftime('%H:%M:%S')}  every {every_s:g} s, Ctrl-C stops\n{text}\n")
            out.flush()
            done += 1
            if iterations is None or done < iterations:
                sleep(every_s)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_teacher_stop(args: argparse.Namespace) -> int:
    from cluster.local import init_ray
    from teacher_service.app import delete_teacher

    init_ray(args.address or "auto", quiet=True)
    delete_teacher(args.app_name)
    print(f"deleted teacher app {args.app_name!r} (and its gRPC ingress)")
    return 0


def add_parser(sub, fmt) -> None:
    teacher = sub.add_parser("teacher", help="deploy and inspect the teacher pool (Ray Serve)",
                             formatter_class=fmt,
                             description="Deploy the frozen teacher as a named Serve app (serve), print its info "
                                         "and counters (status), or delete it (stop).")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    p = t_sub.add_parser("serve", formatter_class=fmt, help="deploy the teacher as a named Serve app",
                         description="Deploy a frozen open_clip teacher as a named, detached Serve "
                                     "app that student runs attach to by name. Use --address to "
                                     "deploy into a running cluster (e.g. after `ray start --head`).")
    p.add_argument("--config", help="TeacherConfig YAML (flags below override it)")
    add_teacher_model_args(p)
    p.add_argument("--app-name", help="Serve application name (default kd-teacher)")  # one app per serve
    p.add_argument("--replicas", type=int, help="number of replicas (a fixed pool)")
    p.add_argument("--autoscale", type=json_arg, metavar="JSON",
                   help='autoscale the pool instead: Serve autoscaling_config as JSON, max_replicas required, '
                        'e.g. \'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}\'')
    p.add_argument("--num-cpus", type=float, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica")
    p.add_argument("--max-batch-size", type=int, help="samples per teacher forward")
    p.add_argument("--answer-dtype", choices=ANSWER_DTYPES,
                   help="dtype of the embeddings answered to requests that name none (serving.answer_dtype; "
                        "default fp16; int8 is about half the bytes; each run may ask for its own)")
    p.add_argument("--role-placement", action="store_true",
                   help="run replicas only on teacher nodes (label kd-role=teacher, resource kd_teacher)")
    p.add_argument("--grpc-port", type=int,
                   help="also serve gRPC (Embed/Stats/Health) for clients outside Ray on this port "
                        "(0: a free port, printed); the ingress runs on this node and stops with the app")
    p.add_argument("--grpc-host",
                   help="address the gRPC ingress binds (default 127.0.0.1: this machine only; "
                        "0.0.0.0 or :: for every interface, which needs --grpc-tls-cert/--grpc-tls-key and "
                        "--grpc-token-file, or --grpc-insecure)")
    p.add_argument("--grpc-token-file",
                   help="owner-only (chmod 600) file with the bearer token gRPC callers must send")
    p.add_argument("--shard-root", action="append", metavar="DIR",
                   help="a directory of training shards every replica's node reads at the students' paths: "
                        "students may then send references instead of pixels (teacher.send_pixels; repeatable)")
    p.add_argument("--grpc-tls-cert", help="PEM certificate (chain) the gRPC ingress presents: TLS only")
    p.add_argument("--grpc-tls-key", help="owner-only (chmod 600) PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-client-ca",
                   help="PEM CA: require every gRPC caller to present a certificate it signed (mutual TLS)")
    p.add_argument("--grpc-insecure", action="store_true", default=None,
                   help="allow a non-loopback --grpc-host without TLS and a token (logs a warning)")
    p.add_argument("--grpc-health-port", type=int,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes' grpc "
                        "probe, which cannot speak TLS); it tells only SERVING or NOT_SERVING")
    add_address(p)
    p.add_argument("--block", action="store_true",
                   help="keep this command running (always so with an embedded cluster)")
    p.set_defaults(func=cmd_teacher_serve)
    for name, func, text in [("status", cmd_teacher_status, "print the teacher's info and counters"),
                             ("stop", cmd_teacher_stop, "delete the teacher app and its gRPC ingress")]:
        p = t_sub.add_parser(name, formatter_class=fmt, help=text, description=text)
        if name == "status":
            add_app_names(p, "Serve application name (default kd-teacher)")
        else:
            p.add_argument("--app-name", default="kd-teacher", help="Serve application name")
        add_address(p, "running")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the merged counters as JSON")
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replicas")
            p.add_argument("--watch", nargs="?", const=2.0, type=positive_seconds, metavar="SECONDS",
                           help="refresh the status in the terminal every SECONDS (default 2) until Ctrl-C")
        p.set_defaults(func=func)
