"""Teacher configuration: which open_clip model to serve and how to size the Serve pool.

One flat dataclass so the same object can come from a YAML file, a Serve config's `args`, or the
`kd` CLI, and travel to replicas as a plain dict (`to_dict` / `from_dict`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

PRECISIONS = ("fp32", "fp16", "bf16")
BATCHERS = ("fill", "serve")
ROUTINGS = ("view_affinity", "power_of_two")
VIEW_AFFINITY_ROUTER = "teacher_service.serve.routing.ViewAffinityRouter"
DEFAULT_GRPC_MAX_REQUEST_BYTES = 64 * 2**20
GRPC_FILE_FIELDS = ("grpc_token_file", "grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tls_client_ca_file")


@dataclass
class TeacherConfig:
    """Model choice (`model`, `pretrained`, `overrides`, `precision`) plus Serve sizing.

    `max_batch_size` counts samples (images or texts), not requests: the Serve batch is sized by
    `batch_size_fn`, so a batch of 256 samples made of 32-sample requests holds 8 requests.
    `expected_request_samples` is the typical request size (a student's per-rank batch); it is only
    used to check that `max_ongoing_requests` lets a replica hold enough requests to fill a batch.
    `seed` makes random initialisation (pretrained=None) identical in every replica and process.

    `autoscaling` (Serve's `autoscaling_config`: `min_replicas`, `max_replicas` — required, so a
    pool never grows without bound — `target_ongoing_requests`, `upscale_delay_s`,
    `downscale_delay_s`, ...) makes Serve scale the replica count on the requests queued and
    running per replica; `num_replicas` is then ignored. `coalesce_memory_rows` bounds each
    replica's table of recently answered rows, keyed by pixel and token digests
    (`coalesce.Coalescer`; 0 keeps only in-flight coalescing); it costs up to 4 * embed_dim bytes
    per row (fp16 image + text) plus ~270 bytes for the identity and table entry, e.g. 219 MB
    for 65 536 rows at D = 768. `max_run_weight` is the largest fair-share weight a run may
    claim (gRPC callers are granted theirs, see `grpc_token_file`).
    `routing`: "view_affinity" (default) sends identical requests from different runs to the same
    replica so they coalesce across replicas (`routing.ViewAffinityRouter`); "power_of_two" is
    Serve's default router. `label_selector` / `resources` keep replicas on teacher nodes (node
    labels such as kd-role=teacher, or a custom resource only teacher nodes have).
    `grpc_port` (None: no gRPC) starts the gRPC ingress (`grpc_server`) with the app, bound to
    `grpc_host`: loopback unless set to another address explicitly ("0.0.0.0" / "::" for every
    interface); port 0 takes a free port (reported by the ingress). `grpc_token_file`: a file only
    its owner can read (chmod 600, on the node that runs the ingress) holding one token or lines
    `<caller-name> <max-weight> <token>` (`auth`); with it, gRPC calls without a listed bearer
    token are refused UNAUTHENTICATED, and a listed token fixes its holder's name and weight cap.
    Without it every gRPC request runs at weight 1. `grpc_tls_cert_file` + `grpc_tls_key_file`
    (PEM; the key owner-only) make the ingress speak TLS only; `grpc_tls_client_ca_file` also
    requires every caller to present a certificate that CA signed (mutual TLS). A `grpc_host` off
    loopback is refused without both TLS and a token file unless `grpc_insecure` is set (then the
    ingress logs a warning). `grpc_health_port` (None: none) adds a plaintext listener serving only
    grpc.health.v1.Health (SERVING / NOT_SERVING of this app), for probes that cannot speak TLS or
    send a token, such as Kubernetes' `grpc:` probe. `grpc_max_request_bytes` bounds one Embed
    message. Per gRPC caller (`caller_limits`): at most `grpc_caller_max_in_flight` Embed rpcs
    unanswered and `grpc_caller_samples_per_s` samples/s (bucket `grpc_caller_burst_samples`,
    default one second's worth); None switches a limit off.
    `cpu_affinity`: CPU cores the process that loads the teacher (a replica, an inline worker, a
    precompute actor) is pinned to (`affinity.pin_process`); empty: not pinned.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = None
    overrides: dict = field(default_factory=dict)
    precision: str = "fp32"
    device: str = "auto"
    app_name: str = "kd-teacher"
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 256
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 32
    max_request_samples: int = 1024
    torch_threads: int | None = None
    expected_request_samples: int = 8
    seed: int = 0
    batcher: str = "fill"  # "fill": SampleBatcher (default); "serve": Serve's @serve.batch
    autoscaling: dict | None = None  # Serve autoscaling_config; None: a fixed num_replicas
    coalesce_memory_rows: int = 65536
    max_run_weight: float = 100.0
    routing: str = "view_affinity"
    grpc_token_file: str | None = None  # gRPC callers must send this file's token as "authorization: Bearer ..."
    grpc_host: str = "127.0.0.1"  # the gRPC ingress's bind address; others only when set explicitly
    grpc_port: int | None = None  # None: no gRPC ingress; 0: a free port
    grpc_max_request_bytes: int = DEFAULT_GRPC_MAX_REQUEST_BYTES
    grpc_caller_max_in_flight: int | None = 64
    grpc_caller_samples_per_s: float | None = None
    grpc_caller_burst_samples: int | None = None
    grpc_tls_cert_file: str | None = None  # PEM certificate (chain) the ingress presents; TLS on with the key
    grpc_tls_key_file: str | None = None  # its PEM private key: owner-only (chmod 600), like the token file
    grpc_tls_client_ca_file: str | None = None  # PEM CA: callers must present a certificate it signed (mTLS)
    grpc_insecure: bool = False  # allow a non-loopback grpc_host without TLS and a token (logs a warning)
    grpc_health_port: int | None = None  # plaintext listener serving grpc.health.v1 only; None: none
    label_selector: dict = field(default_factory=dict)  # node labels replicas need, e.g. {"kd-role": "teacher"}
    resources: dict = field(default_factory=dict)  # custom resources per replica, e.g. {"kd_teacher": 1}
    cpu_affinity: list = field(default_factory=list)  # cores to pin the teacher's process to; empty: none
    # Requests by reference (`serve.references`): directories of training shards every replica's node
    # can read at the same paths as the students; empty (default): only pixel requests are served.
    # `shard_cache_mb` bounds each replica's decoded images of recently read samples.
    shard_roots: list = field(default_factory=list)
    shard_cache_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.pretrained in ("", "none", "None"):
            self.pretrained = None
        elif isinstance(self.pretrained, str) and os.path.exists(os.path.expanduser(self.pretrained)):
            # a local checkpoint: replicas do not run in the deploying process's directory
            self.pretrained = os.path.abspath(os.path.expanduser(self.pretrained))
        for name in GRPC_FILE_FIELDS:
            if getattr(self, name):
                setattr(self, name, os.path.abspath(os.path.expanduser(getattr(self, name))))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: expected a non-empty open_clip model name, got {self.model!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides: expected a dict of create_model kwargs, got {type(self.overrides).__name__}")
        if self.batcher not in BATCHERS:
            raise ValueError(f"batcher: expected one of {BATCHERS}, got {self.batcher!r}")
        check_placement(self.label_selector, self.resources)
        if self.grpc_token_file:
            from teacher_service.grpc.auth import read_token_table

            read_token_table(self.grpc_token_file, self.max_run_weight)  # missing, shared, malformed: refuse now
        self._validate_grpc()
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: expected one of {ROUTINGS}, got {self.routing!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _require(self.num_replicas >= 1, "num_replicas", self.num_replicas, ">= 1")
        _require(self.num_cpus >= 0, "num_cpus", self.num_cpus, ">= 0")
        _require(self.num_gpus >= 0, "num_gpus", self.num_gpus, ">= 0")
        _require(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, ">= 1")
        _require(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", self.batch_wait_timeout_s, ">= 0")
        _require(self.max_request_samples >= 1, "max_request_samples", self.max_request_samples, ">= 1")
        _require(self.expected_request_samples >= 1, "expected_request_samples",
                 self.expected_request_samples, ">= 1")
        _require(self.coalesce_memory_rows >= 0, "coalesce_memory_rows", self.coalesce_memory_rows, ">= 0")
        _require(self.max_run_weight > 0, "max_run_weight", self.max_run_weight, "> 0")
        if self.autoscaling is not None:
            self._validate_autoscaling()
        if self.torch_threads is not None:
            _require(self.torch_threads >= 1, "torch_threads", self.torch_threads, ">= 1 or None")
        check_cores(self.cpu_affinity)
        needed = self.requests_to_fill_batch()
        if self.max_ongoing_requests < needed:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} is too small: a batch of "
                f"max_batch_size={self.max_batch_size} samples needs {needed} requests of "
                f"expected_request_samples={self.expected_request_samples} in flight on one replica, "
                f"and Serve never lets more than max_ongoing_requests reach a replica, so batches "
                f"would never fill. Raise max_ongoing_requests to >= {needed} (2x that keeps the next "
                f"batch filling while one runs) or lower max_batch_size."
            )

    def _validate_autoscaling(self) -> None:
        """Serve's own AutoscalingConfig checks the fields; we also require an explicit max_replicas."""
        from ray.serve.config import AutoscalingConfig

        a = self.autoscaling
        if not isinstance(a, dict):
            raise ValueError(f"autoscaling: expected a mapping of Serve autoscaling_config fields, got {a!r}")
        if "max_replicas" not in a:
            raise ValueError("autoscaling: set max_replicas explicitly (Serve's default would let the pool grow "
                             "to 100 replicas)")
        try:
            AutoscalingConfig(**a)
        except Exception as e:  # pydantic's ValidationError names the field
            raise ValueError(f"autoscaling: {e}") from e

    def _validate_grpc(self) -> None:
        """The bind address must be an IP literal: a host name could resolve to any interface."""
        try:
            ipaddress.ip_address(self.grpc_host)
        except ValueError:
            raise ValueError(f"grpc_host: expected an IP address to bind (127.0.0.1, ::1, or 0.0.0.0 / :: for "
                             f"every interface), got {self.grpc_host!r}") from None
        if self.grpc_port is not None:
            _require(isinstance(self.grpc_port, int) and 0 <= self.grpc_port <= 65535, "grpc_port", self.grpc_port,
                     "an int in 0..65535 (0: a free port) or None")
        _require(isinstance(self.grpc_max_request_bytes, int) and self.grpc_max_request_bytes >= 1,
                 "grpc_max_request_bytes", self.grpc_max_request_bytes, "an int >= 1")
        self.caller_limits()  # checks the per-caller fields, naming the bad one
        self._validate_grpc_health_port()
        self._validate_tls()
        self._validate_exposure()

    def _validate_grpc_health_port(self) -> None:
        if self.grpc_health_port is None:
            return
        _require(isinstance(self.grpc_health_port, int) and 0 <= self.grpc_health_port <= 65535,
                 "grpc_health_port", self.grpc_health_port, "an int in 0..65535 (0: a free port) or None")
        if self.grpc_port is None:
            raise ValueError("grpc_health_port: set grpc_port too (the health port reports the gRPC ingress)")
        if self.grpc_health_port and self.grpc_health_port == self.grpc_port:
            raise ValueError(f"grpc_health_port: {self.grpc_health_port} is grpc_port too; give another port")

    def _validate_tls(self) -> None:
        """Cert and key come together; a client CA needs them; the key is owner-only. Checked here so
        a bad file is an error at config time, not a gRPC start failure inside the ingress actor."""
        from teacher_service.private_files import check_owner_only

        cert, key, client_ca = self.grpc_tls_cert_file, self.grpc_tls_key_file, self.grpc_tls_client_ca_file
        if bool(cert) != bool(key):
            missing = "grpc_tls_key_file (--grpc-tls-key)" if cert else "grpc_tls_cert_file (--grpc-tls-cert)"
            raise ValueError(f"{missing}: TLS needs both the certificate and its private key")
        if client_ca and not cert:
            raise ValueError("grpc_tls_client_ca_file (--grpc-tls-client-ca): mutual TLS needs the server's own "
                             "grpc_tls_cert_file and grpc_tls_key_file too")
        if key:
            check_owner_only(key, "grpc_tls_key_file")
            _require_pem(key, "grpc_tls_key_file", "PRIVATE KEY-----")
        for name, path in (("grpc_tls_cert_file", cert), ("grpc_tls_client_ca_file", client_ca)):
            if path:
                _require_pem(path, name, "-----BEGIN CERTIFICATE-----")

    def _validate_exposure(self) -> None:
        """An ingress off loopback needs TLS (or the token travels in clear text) and a token (or anyone
        who reaches the address uses the teacher), unless the operator says grpc_insecure."""
        if not isinstance(self.grpc_insecure, bool):
            raise ValueError(f"grpc_insecure: expected true or false, got {self.grpc_insecure!r}")
        missing = self.grpc_exposure_gaps()
        if missing and not self.grpc_insecure:
            raise ValueError(f"grpc_host {self.grpc_host!r} is not a loopback address: serving gRPC off this machine "
                             f"needs {' and '.join(missing)}; or pass --grpc-insecure (grpc_insecure: true) to "
                             "serve it without them anyway")

    def grpc_exposure_gaps(self) -> list[str]:
        """What an ingress reachable from other machines lacks (TLS, a token); empty on loopback."""
        if self.grpc_port is None or self.grpc_is_loopback():
            return []
        gaps = []
        if not self.grpc_tls_enabled():
            gaps.append("TLS (--grpc-tls-cert and --grpc-tls-key; grpc_tls_cert_file, grpc_tls_key_file)")
        if not self.grpc_token_file:
            gaps.append("a bearer token (--grpc-token-file; grpc_token_file)")
        return gaps

    def grpc_tls_enabled(self) -> bool:
        return bool(self.grpc_tls_cert_file and self.grpc_tls_key_file)

    def grpc_is_loopback(self) -> bool:
        """True when the ingress is reachable from this machine only."""
        return ipaddress.ip_address(self.grpc_host).is_loopback

    def replica_dict(self) -> dict:
        """`to_dict` without the gRPC ingress's settings: replicas do not use them, and its files (token,
        TLS key) live on the ingress's node only, so a replica elsewhere must not be asked to read them."""
        return dataclasses.asdict(dataclasses.replace(
            self, grpc_port=None, grpc_health_port=None, grpc_host="127.0.0.1", grpc_insecure=False,
            **{name: None for name in GRPC_FILE_FIELDS}))

    def caller_limits(self):
        """The per-caller limits of the gRPC ingress (`caller_limits.CallerLimits`)."""
        from teacher_service.grpc.caller_limits import CallerLimits

        return CallerLimits(max_in_flight=self.grpc_caller_max_in_flight, samples_per_s=self.grpc_caller_samples_per_s,
                            burst_samples=self.grpc_caller_burst_samples)

    def serve_options(self) -> dict[str, Any]:
        """The deployment options Serve takes for this pool (replica count or autoscaling, resources)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.label_selector:
            actor["label_selector"] = dict(self.label_selector)
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests, "ray_actor_options": actor}
        if self.autoscaling is not None:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        if self.routing == "view_affinity":
            from ray.serve.config import RequestRouterConfig

            options["request_router_config"] = RequestRouterConfig(request_router_class=VIEW_AFFINITY_ROUTER)
        return options

    def requests_to_fill_batch(self) -> int:
        """Requests of `expected_request_samples` samples that make one full batch."""
        return math.ceil(self.max_batch_size / min(self.expected_request_samples, self.max_batch_size))

    def to_dict(self) -> dict:
        """Plain, deep-copied dict (YAML/pickle friendly) that `from_dict` accepts."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherConfig:
        """Build from a mapping; unknown keys are an error so typos never pass silently."""
        if not isinstance(d, dict):
            raise ValueError(f"teacher config: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"teacher config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TeacherConfig:
        """Load a YAML mapping of TeacherConfig fields, or a Serve config (`serve deploy` file) with one
        application built by `teacher_service.serve.deployment:app_builder`, whose `args` are those fields."""
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict) and "applications" in data:
            apps = data["applications"] or []
            if len(apps) != 1 or not isinstance(apps[0], dict):
                raise ValueError(f"{path}: a Serve config with {len(apps)} applications; expected exactly one teacher app")
            data = apps[0].get("args") or {}
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write atomically (tmp file + os.replace)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)


def check_placement(labels: Any, resources: Any, label_field: str = "label_selector",
                    resource_field: str = "resources") -> None:
    """Node labels are str → str; custom resources are name → amount > 0 (CPU/GPU have their own fields)."""
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"{label_field}: expected a mapping of node label → value (strings), got {labels!r}")
    if not isinstance(resources, dict):
        raise ValueError(f"{resource_field}: expected a mapping of custom resource name → amount, got {resources!r}")
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(f"{resource_field}: {name!r} has its own field; list custom resources only")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{resource_field}: {name} = {amount!r}, expected a number > 0")


def check_cores(cores: Any, name: str = "cpu_affinity") -> None:
    """A list of distinct core ids >= 0 (empty: no pinning)."""
    if not isinstance(cores, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                      for c in cores) or len(set(cores)) != len(cores):
        raise ValueError(f"{name}: expected a list of distinct CPU core ids >= 0, got {cores!r}")


def _require_pem(path: str, name: str, marker: str) -> None:
    """The file exists, is readable and holds a PEM block with `marker` (e.g. "PRIVATE KEY-----")."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise ValueError(f"{name} {path!r}: {e.strerror}") from e
    if marker not in text:
        raise ValueError(f"{name} {path!r} holds no PEM block with {marker.strip('-')!r}")


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
