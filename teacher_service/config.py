"""Teacher configuration, split by concern as Ray splits gRPCOptions, HTTPOptions and AutoscalingConfig.

`TeacherConfig` is the model (architecture, weights, precision, the process that loads it) with two
sections: `serving` (`ServingConfig`: how the Serve pool runs it) and `grpc` (`GrpcOptions`: the
ingress for callers outside Ray). The same object comes from a YAML file, a Serve config's `args`
or the `kd` CLI, and travels as a plain dict (`to_dict` / `from_dict`); a replica receives the
model and serving only (`replica_dict`), never the ingress's files.

Mappings of the flat config this replaced (one level, 38 keys) still load: `from_dict` moves each
flat key to its section and warns once per load, naming where each key went (`nest_flat_keys`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from teacher_service.answer_dtypes import ANSWER_DTYPES, check_answer_dtype
from teacher_service.atomic_files import write_atomic

PRECISIONS = ("fp32", "fp16", "bf16")
BATCHERS = ("fill", "serve")
ROUTINGS = ("view_affinity", "power_of_two")
VIEW_AFFINITY_ROUTER = "teacher_service.serve.routing.ViewAffinityRouter"
DEFAULT_GRPC_MAX_REQUEST_BYTES = 64 * 2**20
GRPC_FILE_FIELDS = ("token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")


@dataclass
class ServingConfig:
    """How the Serve pool runs the teacher: its name, replicas, batching, scheduling and placement.

    `app_name` is the Serve application: students and the gRPC ingress find the pool by it, and the
    replicas label their metrics with it. It lives here, not with the model, because only a pool has
    one: the same model loaded inline in a student or in a precompute actor has no app.

    `max_batch_size` counts samples (images or texts), not requests: the Serve batch is sized by
    `batch_size_fn`, so a batch of 256 samples made of 32-sample requests holds 8 requests.
    `expected_request_samples` is the typical request size (a student's per-rank batch); it is only
    used to check that `max_ongoing_requests` lets a replica hold enough requests to fill a batch.
    `batcher`: "fill" (`batching.SampleBatcher`, default) or "serve" (Serve's @serve.batch).

    `autoscaling` (Serve's `autoscaling_config`: `min_replicas`, `max_replicas` — required, so a
    pool never grows without bound — `target_ongoing_requests`, `upscale_delay_s`,
    `downscale_delay_s`, ...) makes Serve scale the replica count on the requests queued and
    running per replica; `num_replicas` is then ignored. `coalesce_memory_rows` bounds each
    replica's table of recently answered rows, keyed by pixel and token digests
    (`coalesce.Coalescer`; 0 keeps only in-flight coalescing); it costs up to 4 * embed_dim bytes
    per row (fp16 image + text) plus ~270 bytes for the identity and table entry, e.g. 219 MB
    for 65 536 rows at D = 768. `max_run_weight` is the largest fair-share weight a run may
    claim (gRPC callers are granted theirs, see `GrpcOptions.token_file`).
    `routing`: "view_affinity" (default) sends identical requests from different runs to the same
    replica so they coalesce across replicas (`routing.ViewAffinityRouter`); "power_of_two" is
    Serve's default router. `label_selector` / `resources` keep replicas on teacher nodes (node
    labels such as kd-role=teacher, or a custom resource only teacher nodes have).
    `shard_roots`: directories of training shards every replica's node can read at the same paths
    as the students, for requests by reference (`serve.references`); empty (default): only pixel
    requests are served. `shard_cache_mb` bounds each replica's decoded images of recently read samples.
    `answer_dtype`: the dtype of the embeddings the pool answers in when a request does not name
    one ("fp16", "bf16" or "int8", `contract.answer_codec`); each request may ask for its own, so
    one pool serves runs of every dtype at once, computing a shared sample once.
    """

    app_name: str = "kd-teacher"
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 256
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 32
    max_request_samples: int = 1024
    expected_request_samples: int = 8
    batcher: str = "fill"
    autoscaling: dict | None = None  # Serve autoscaling_config; None: a fixed num_replicas
    routing: str = "view_affinity"
    coalesce_memory_rows: int = 65536
    max_run_weight: float = 100.0
    label_selector: dict = field(default_factory=dict)  # node labels replicas need, e.g. {"kd-role": "teacher"}
    resources: dict = field(default_factory=dict)  # custom resources per replica, e.g. {"kd_teacher": 1}
    shard_roots: list = field(default_factory=list)
    shard_cache_mb: float = 256.0
    answer_dtype: str = "fp16"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field (as `serving.<field>`)."""
        if self.batcher not in BATCHERS:
            raise ValueError(f"serving.batcher: expected one of {BATCHERS}, got {self.batcher!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"serving.routing: expected one of {ROUTINGS}, got {self.routing!r}")
        check_answer_dtype(self.answer_dtype, "serving.answer_dtype")
        check_placement(self.label_selector, self.resources, "serving.label_selector", "serving.resources")
        for name in ("num_replicas", "max_batch_size", "max_request_samples", "expected_request_samples"):
            _require(getattr(self, name) >= 1, f"serving.{name}", getattr(self, name), ">= 1")
        for name in ("num_cpus", "num_gpus", "batch_wait_timeout_s", "coalesce_memory_rows", "shard_cache_mb"):
            _require(getattr(self, name) >= 0, f"serving.{name}", getattr(self, name), ">= 0")
        _require(self.max_run_weight > 0, "serving.max_run_weight", self.max_run_weight, "> 0")
        if self.autoscaling is not None:
            self._validate_autoscaling()
        needed = self.requests_to_fill_batch()
        if self.max_ongoing_requests < needed:
            raise ValueError(
                f"serving.max_ongoing_requests={self.max_ongoing_requests} is too small: a batch of "
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
            raise ValueError(f"serving.autoscaling: expected a mapping of Serve autoscaling_config fields, got {a!r}")
        if "max_replicas" not in a:
            raise ValueError("serving.autoscaling: set max_replicas explicitly (Serve's default would let the pool "
                             "grow to 100 replicas)")
        try:
            AutoscalingConfig(**a)
        except Exception as e:  # pydantic's ValidationError names the field
            raise ValueError(f"serving.autoscaling: {e}") from e

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


@dataclass
class GrpcOptions:
    """The gRPC ingress (`grpc.ingress`), for callers outside Ray; read by the ingress only.

    `port` (None: no gRPC) starts the ingress with the app, bound to `host`: loopback unless set to
    another address explicitly ("0.0.0.0" / "::" for every interface); port 0 takes a free port
    (reported by the ingress). `token_file`: a file only its owner can read (chmod 600, on the node
    that runs the ingress) holding one token or lines `<caller-name> <max-weight> <token>` (`auth`);
    with it, gRPC calls without a listed bearer token are refused UNAUTHENTICATED, and a listed
    token fixes its holder's name and weight cap (at most `serving.max_run_weight`). Without it
    every gRPC request runs at weight 1. `tls_cert_file` + `tls_key_file` (PEM; the key owner-only)
    make the ingress speak TLS only; `tls_client_ca_file` also requires every caller to present a
    certificate that CA signed (mutual TLS). A `host` off loopback is refused without both TLS and a
    token file unless `insecure` is set (then the ingress logs a warning). `health_port` (None:
    none) adds a plaintext listener serving only grpc.health.v1.Health (SERVING / NOT_SERVING of
    this app), for probes that cannot speak TLS or send a token, such as Kubernetes' `grpc:` probe.
    `max_request_bytes` bounds one Embed message. Per gRPC caller (`caller_limits`): at most
    `caller_max_in_flight` Embed rpcs unanswered and `caller_samples_per_s` samples/s (bucket
    `caller_burst_samples`, default one second's worth); None switches a limit off.

    Its files (token, TLS key) live on the ingress's node only: replicas never receive this section.
    """

    port: int | None = None  # None: no gRPC ingress; 0: a free port
    host: str = "127.0.0.1"  # the bind address; others only when set explicitly
    token_file: str | None = None  # callers must send this file's token as "authorization: Bearer ..."
    tls_cert_file: str | None = None  # PEM certificate (chain) the ingress presents; TLS on with the key
    tls_key_file: str | None = None  # its PEM private key: owner-only (chmod 600), like the token file
    tls_client_ca_file: str | None = None  # PEM CA: callers must present a certificate it signed (mTLS)
    insecure: bool = False  # allow a non-loopback host without TLS and a token (logs a warning)
    health_port: int | None = None  # plaintext listener serving grpc.health.v1 only; None: none
    max_request_bytes: int = DEFAULT_GRPC_MAX_REQUEST_BYTES
    caller_max_in_flight: int | None = 64
    caller_samples_per_s: float | None = None
    caller_burst_samples: int | None = None

    def __post_init__(self) -> None:
        for name in GRPC_FILE_FIELDS:  # the ingress does not run in the deploying process's directory
            if getattr(self, name):
                setattr(self, name, os.path.abspath(os.path.expanduser(getattr(self, name))))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (as `grpc.<field>`). The bind address must be an
        IP literal: a host name could resolve to any interface. The token file's weights are checked
        against serving.max_run_weight by `TeacherConfig.validate`."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"grpc.host: expected an IP address to bind (127.0.0.1, ::1, or 0.0.0.0 / :: for "
                             f"every interface), got {self.host!r}") from None
        if self.port is not None:
            _require(isinstance(self.port, int) and 0 <= self.port <= 65535, "grpc.port", self.port,
                     "an int in 0..65535 (0: a free port) or None")
        _require(isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1,
                 "grpc.max_request_bytes", self.max_request_bytes, "an int >= 1")
        self.caller_limits()  # checks the per-caller fields, naming the bad one
        self._validate_health_port()
        self._validate_tls()
        self._validate_exposure()

    def _validate_health_port(self) -> None:
        if self.health_port is None:
            return
        _require(isinstance(self.health_port, int) and 0 <= self.health_port <= 65535,
                 "grpc.health_port", self.health_port, "an int in 0..65535 (0: a free port) or None")
        if self.port is None:
            raise ValueError("grpc.health_port: set grpc.port too (the health port reports the gRPC ingress)")
        if self.health_port and self.health_port == self.port:
            raise ValueError(f"grpc.health_port: {self.health_port} is grpc.port too; give another port")

    def _validate_tls(self) -> None:
        """Cert and key come together; a client CA needs them; the key is owner-only. Checked here so
        a bad file is an error at config time, not a gRPC start failure inside the ingress actor."""
        from teacher_service.private_files import check_owner_only

        cert, key, client_ca = self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file
        if bool(cert) != bool(key):
            missing = "grpc.tls_key_file (--grpc-tls-key)" if cert else "grpc.tls_cert_file (--grpc-tls-cert)"
            raise ValueError(f"{missing}: TLS needs both the certificate and its private key")
        if client_ca and not cert:
            raise ValueError("grpc.tls_client_ca_file (--grpc-tls-client-ca): mutual TLS needs the server's own "
                             "grpc.tls_cert_file and grpc.tls_key_file too")
        if key:
            check_owner_only(key, "grpc.tls_key_file")
            _require_pem(key, "grpc.tls_key_file", "PRIVATE KEY-----")
        for name, path in (("grpc.tls_cert_file", cert), ("grpc.tls_client_ca_file", client_ca)):
            if path:
                _require_pem(path, name, "-----BEGIN CERTIFICATE-----")

    def _validate_exposure(self) -> None:
        """An ingress off loopback needs TLS (or the token travels in clear text) and a token (or anyone
        who reaches the address uses the teacher), unless the operator says `insecure`."""
        if not isinstance(self.insecure, bool):
            raise ValueError(f"grpc.insecure: expected true or false, got {self.insecure!r}")
        missing = self.exposure_gaps()
        if missing and not self.insecure:
            raise ValueError(f"grpc.host {self.host!r} is not a loopback address: serving gRPC off this machine "
                             f"needs {' and '.join(missing)}; or pass --grpc-insecure (grpc.insecure: true) to "
                             "serve it without them anyway")

    def exposure_gaps(self) -> list[str]:
        """What an ingress reachable from other machines lacks (TLS, a token); empty on loopback."""
        if self.port is None or self.is_loopback():
            return []
        gaps = []
        if not self.tls_enabled():
            gaps.append("TLS (--grpc-tls-cert and --grpc-tls-key; grpc.tls_cert_file, grpc.tls_key_file)")
        if not self.token_file:
            gaps.append("a bearer token (--grpc-token-file; grpc.token_file)")
        return gaps

    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    def is_loopback(self) -> bool:
        """True when the ingress is reachable from this machine only."""
        return ipaddress.ip_address(self.host).is_loopback

    def caller_limits(self):
        """The per-caller limits of the gRPC ingress (`caller_limits.CallerLimits`)."""
        from teacher_service.grpc.caller_limits import CallerLimits

        return CallerLimits(max_in_flight=self.caller_max_in_flight, samples_per_s=self.caller_samples_per_s,
                            burst_samples=self.caller_burst_samples)


@dataclass
class TeacherConfig:
    """The teacher: which open_clip model, loaded how, in which process; then `serving` (the Serve
    pool) and `grpc` (its ingress for callers outside Ray).

    The model's fields stay at the top level: they are what a teacher is (its fingerprint follows
    from them), and what every consumer reads, in every mode: a Serve replica, a student's inline
    teacher, a precompute actor, `init_from_teacher`. A teacher YAML that names only a model (the
    usual inline or cache teacher) is therefore the same in both shapes.

    `seed` makes random initialisation (pretrained=None) identical in every replica and process.
    `torch_threads` and `cpu_affinity` (CPU cores, `affinity.pin_process`; empty: not pinned) shape
    the process that loads the model, whichever it is (a replica, an inline worker, a precompute
    actor), which is why they belong here and not to `serving`.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = None
    overrides: dict = field(default_factory=dict)
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    torch_threads: int | None = None
    cpu_affinity: list = field(default_factory=list)  # cores to pin the teacher's process to; empty: none
    serving: ServingConfig = field(default_factory=ServingConfig)
    grpc: GrpcOptions = field(default_factory=GrpcOptions)

    def __post_init__(self) -> None:
        if self.pretrained in ("", "none", "None"):
            self.pretrained = None
        elif isinstance(self.pretrained, str) and os.path.exists(os.path.expanduser(self.pretrained)):
            # a local checkpoint: replicas do not run in the deploying process's directory
            self.pretrained = os.path.abspath(os.path.expanduser(self.pretrained))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field. The sections check their own fields
        when built (`ServingConfig.validate`, `GrpcOptions.validate`); this checks the model's (the
        architecture, pretrained tag or file and overrides against open_clip: `model_check`) and the
        one rule across sections: a token file's weight caps within serving.max_run_weight."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: expected a non-empty open_clip model name, got {self.model!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides: expected a dict of create_model kwargs, got {type(self.overrides).__name__}")
        from teacher_service.model_check import check_model

        check_model(self.model, self.pretrained, self.overrides)  # open_clip's registry and files only: no download
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.torch_threads is not None:
            _require(self.torch_threads >= 1, "torch_threads", self.torch_threads, ">= 1 or None")
        check_cores(self.cpu_affinity)
        for name, kind in (("serving", ServingConfig), ("grpc", GrpcOptions)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name}: expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.grpc.token_file:
            from teacher_service.grpc.auth import read_token_table

            # missing, shared, malformed, or a cap over the pool's: refuse now
            read_token_table(self.grpc.token_file, self.serving.max_run_weight)

    def replica_dict(self) -> dict:
        """`to_dict` without the `grpc` section: replicas do not use it, and its files (token, TLS key)
        live on the ingress's node only, so a replica elsewhere must not be asked to read them."""
        return {name: value for name, value in self.to_dict().items() if name != "grpc"}

    def updated(self, changes: dict[str, Any]) -> TeacherConfig:
        """A validated copy with `changes` applied; a section's fields are named with a dot
        (`{"serving.num_replicas": 2, "grpc.port": 0, "precision": "fp16"}`)."""
        data = self.to_dict()
        for key, value in changes.items():
            section, _, name = key.rpartition(".")
            if section and section not in data:
                raise ValueError(f"teacher config: unknown section in {key!r}; sections are {list(SECTIONS)}")
            (data[section] if section else data)[name] = value
        return type(self).from_dict(data)

    def to_dict(self) -> dict:
        """Plain, deep-copied, nested dict (YAML/pickle friendly) that `from_dict` accepts."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "teacher config") -> TeacherConfig:
        """Build from a mapping in the sectioned shape, or the flat one (warned about once, see
        `nest_flat_keys`). Unknown keys are an error so typos never pass silently; `where` names the
        mapping in errors and the warning."""
        data, moved = nest_flat_keys(d, where=where)
        warn_flat_keys(moved, where)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
        sections = {name: _section(kind, data.get(name), name, where) for name, kind in SECTIONS.items()}
        return cls(**{**data, **sections})

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> TeacherConfig:
        """The teacher a cache recorded (`teacher_config` in its files' metadata), in either shape,
        without its gRPC section (a record's ingress files are not this machine's) and without a
        deprecation warning: whoever reads an old cache cannot rewrite it."""
        data, _ = nest_flat_keys(d, where="recorded teacher config")
        data.pop("grpc", None)
        return cls.from_dict(data, where="recorded teacher config")

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
            data, moved = nest_flat_keys(data)
            warn_flat_keys(moved, f"{path}: teacher config")
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader (a `kd teacher serve --config` elsewhere) sees the whole file or none."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {"serving": ServingConfig, "grpc": GrpcOptions}
# Where each key of the flat TeacherConfig (before the sections) lives now: serving's under their
# own names, the ingress's without their `grpc_` prefix. The model's keys did not move.
FLAT_KEYS = {**{f.name: f"serving.{f.name}" for f in dataclasses.fields(ServingConfig)},
             **{f"grpc_{f.name}": f"grpc.{f.name}" for f in dataclasses.fields(GrpcOptions)}}


def nest_flat_keys(d: Any, prefix: str = "", where: str = "teacher config") -> tuple[dict, list[str]]:
    """`d` (a teacher mapping) with the flat config's keys moved into their sections, and one
    "old -> new" note per key moved (`prefix` before both, e.g. "teacher.teacher."). Does not
    change `d`; a field given both flat and in its section is an error."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    data = {key: value for key, value in d.items() if key not in FLAT_KEYS}
    moved = []
    for key in (k for k in d if k in FLAT_KEYS):
        section, name = FLAT_KEYS[key].split(".")
        if data.get(section) is None:
            data[section] = {}
        elif not isinstance(data[section], dict):
            raise ValueError(f"{where}: {prefix}{section}: expected a mapping, got {type(data[section]).__name__}")
        elif d.get(section) is data[section]:
            data[section] = dict(data[section])  # a copy: the caller's mapping stays as it was
        if name in data[section]:
            raise ValueError(f"{where}: {prefix}{FLAT_KEYS[key]} is given twice: as {prefix}{section}.{name} and "
                             f"as the flat key {prefix}{key}")
        data[section][name] = d[key]
        moved.append(f"{prefix}{key} -> {prefix}{FLAT_KEYS[key]}")
    return data, moved


def warn_flat_keys(moved: list[str], where: str = "teacher config") -> None:
    """One deprecation line for a whole load, naming the new place of every flat key it used."""
    if moved:
        warnings.warn(f"{where}: flat keys are deprecated: {', '.join(moved)}", FutureWarning, stacklevel=3)


def _section(kind: type, value: Any, name: str, where: str) -> Any:
    """A section from its mapping (None or absent: the defaults); unknown keys named as `<section>.<key>`."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {name}: expected a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {[f'{name}.{k}' for k in unknown]}; known keys of {name} are "
                         f"{sorted(known)}")
    return kind(**value)


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
