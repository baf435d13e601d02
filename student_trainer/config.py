"""Run configuration as data: nested dataclasses that round-trip through YAML/JSON dicts."""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from teacher_service.atomic_files import write_atomic
from teacher_service.config import ANSWER_DTYPES, TeacherConfig, check_cores, check_placement, nest_flat_keys, warn_flat_keys
from teacher_service.private_files import check_under_roots, write_roots

from student_trainer.teacher.modes import TeacherMode

# The recipe a run with a teacher uses when it names no losses: the one the methods benchmark
# finds best on the digits task (benchmarks/results/methods.md); the demo uses it too.
DEFAULT_DISTILL_LOSSES = {"clip": 1.0, "icl": 1.0}
INHERIT_LAYERS = ("interval", "first")  # which teacher blocks an inheriting student takes (student_trainer.inherit)
SEND_PIXELS = ("auto", "always", "reference")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ModelConfig:
    """An open_clip architecture; `overrides` are passed to `open_clip.create_model` as kwargs.

    Where the weights start: random, `pretrained` (an open_clip tag or file), or with
    `init_from_teacher` the run's teacher's weights cut to the student's shape (TinyCLIP's weight
    inheritance, `student_trainer.inherit`); `inherit_layers` picks the teacher blocks taken:
    "interval" (block i·⌊n/k⌋, TinyCLIP's) or "first" (the first k). Only a fresh run inherits.
    """

    name: str = "ViT-B-32"
    pretrained: str | None = None
    overrides: dict = field(default_factory=dict)
    init_from_teacher: bool = False
    inherit_layers: str = "interval"


@dataclass
class DataConfig:
    """WebDataset shards and the student's view of them."""

    train_shards: str = ""
    val_shards: str | None = None
    image_size: int = 32  # side of the augmented uint8 view the student trains on (and sends)
    batch_size: int = 64  # per worker
    shuffle_buffer: int = 500
    # Augmented views per sample: epoch e trains on view e % num_views, so K precomputed (or
    # hybrid-appended) views serve every epoch (MobileCLIP-style). None: a new view every epoch.
    num_views: int | None = None

    def view_of(self, epoch: int) -> int:
        """The view id an epoch trains on (the cache key alongside the sample key)."""
        return epoch % self.num_views if self.num_views else epoch


class _ModeField:
    """`TeacherSourceConfig.mode`: whatever is assigned (a string from YAML, a flag or code, or a
    TeacherMode) is stored as a TeacherMode, so the code that reads it asks the mode's facts."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> TeacherMode:
        return TeacherMode.NONE if obj is None else getattr(obj, self.attr)  # None: the field's default

    def __set__(self, obj: Any, value: str | TeacherMode) -> None:
        setattr(obj, self.attr, TeacherMode.parse(value))


@dataclass
class TeacherSourceConfig:
    """Where teacher embeddings come from: a `TeacherMode` (none, inline, remote, cache, hybrid)."""

    mode: TeacherMode = _ModeField()
    cache_path: str | None = None  # embedding cache directory for `cache` / `hybrid`
    # A cache root holds one set of rows per teacher fingerprint (teacher_service.cache.store). Hybrid
    # reads and appends the rows of its app's fingerprint; `cache` reads the root's only teacher, or
    # this one: a fingerprint, or a model name only one teacher of the root has (`kd cache info`).
    cache_teacher: str | None = None
    app_name: str = "kd-teacher"
    teacher: TeacherConfig | None = None  # required for `inline`
    prefetch: int = 2  # batches requested ahead of the one being trained
    timeout_s: float = 60.0  # per teacher call
    retries: int = 3  # re-sends after a failed/timed-out call before the run stops
    # How long the run waits for a teacher that stopped answering (app redeployed, pool down),
    # re-sending with backoff. After both `retries` and `patience_s` are spent the run checkpoints
    # where it is and stops; rerunning it resumes there. Hybrid cache hits need no teacher.
    patience_s: float = 120.0
    weight: float = 1.0  # this run's share of a contended teacher pool: weight / sum of waiting runs' weights
    coalesce: bool = True  # send view identities so the pool computes samples other runs share once
    # A checkpoint records the teacher it was distilled from; resuming against another teacher
    # fingerprint is refused unless this is set (then the change is recorded in the provenance).
    allow_teacher_change: bool = False
    # How remote/hybrid requests carry images. "always": the pixels (151 KB a 224 px view).
    # "reference": (shard, key, view, recipe, SHA-256) per sample, ~36 bytes + key; the teacher regenerates
    # the view and refuses a digest mismatch; needs a teacher whose `shard_roots` hold the shards at
    # the same paths. "auto" (default): references for shards the teacher says it can read
    # (`check_shards`), pixels otherwise and from the first refusal on; with a teacher without
    # `shard_roots` that is exactly "always".
    send_pixels: str = "auto"
    # The dtype this run's teacher answers come in: "fp16", "bf16" or "int8" (teacher_service.contract
    # .answer_codec; int8 is about half of fp16's bytes). None: the pool's `serving.answer_dtype`
    # (remote), the cache's dtype else the pool's (hybrid: misses are asked and appended in it), fp16
    # (inline: its answers go through the same codec). A `cache` run reads rows as they were stored
    # (`kd precompute --answer-dtype`).
    answer_dtype: str | None = None
    # Several teachers at once (an ensemble; issue 17). Each entry is a mapping of this class's
    # fields plus `name`; fields an entry leaves out are this config's (so `mode: remote` above and
    # `{name: big, app_name: kd-big}` below is a remote teacher). Empty: this config is the one teacher.
    sources: list = field(default_factory=list)
    name: str = ""  # the teacher's name in an ensemble (losses, metrics, provenance); default: app or cache
    loss_weight: float = 1.0  # this teacher's share of the ensemble's targets (normalised over the teachers)
    # Per-sample teacher choice: the class labels this teacher answers (None: every sample). Samples
    # of other labels are not sent to it, and losses use only the teachers that answered a sample.
    labels: list | None = None

    def members(self) -> list[TeacherSourceConfig]:
        """Every teacher of the run as a full config: `sources` entries over this config's fields
        (each named), or this config alone. A one-entry list is a single teacher, as without it."""
        if not self.sources:
            return [self]
        base = {k: v for k, v in to_plain(self).items() if k not in ("sources", "name", "labels", "loss_weight")}
        members = []
        for i, entry in enumerate(self.sources):
            if not isinstance(entry, dict):
                raise ValueError(f"teacher.sources[{i}]: expected a mapping, got {type(entry).__name__}")
            if "sources" in entry:
                raise ValueError(f"teacher.sources[{i}]: an entry cannot list sources of its own")
            member = from_plain(TeacherSourceConfig, {**base, **entry}, f"teacher.sources[{i}]")
            member.name = member.name or member.default_name()
            members.append(member)
        return members

    def default_name(self) -> str:
        """What names a teacher that was given no name: its app (remote, hybrid), cache, or mode."""
        if self.mode.needs_app:
            return self.app_name
        if self.mode.reads_cache and self.cache_path:
            return self.cache_teacher or os.path.basename(os.path.normpath(self.cache_path))
        return self.mode.value

    @property
    def is_ensemble(self) -> bool:
        return len(self.sources) > 1

    @property
    def has_teacher(self) -> bool:
        """Whether any teacher of the run gives outputs (a mode other than none)."""
        return any(m.mode.gives_outputs for m in self.members())


SELECTION_SCORES = ("uniform", "teacher_loss", "learnability")
SELECTION_SCOPES = ("rank",)


@dataclass
class SelectionConfig:
    """Teacher-scored data selection (`student_trainer.selection`, issue 30): every step draws a
    super-batch of `k` × `data.batch_size` samples per rank, scores them, and trains on the
    `data.batch_size` that score highest, with the teacher embeddings the super-batch was answered
    with (no second teacher forward).

    `score`: `uniform` (the first rows of the shuffled super-batch: the same code path without a
    choice, the control), `teacher_loss` (the teacher's own per-sample contrastive loss on the
    super-batch, `teacher_service.scores`), `learnability` (the student's per-sample loss, computed on
    the student without gradients, minus the teacher's: JEST's choice of samples the student has not
    learned yet but the teacher has). With several teachers their scores are averaged with their
    normalised `loss_weight`s, as the losses mix them.

    `scope`: `rank`, the one scope: each DDP rank draws, scores and keeps its own super-batch, so
    every rank trains on `data.batch_size` rows (DDP's step counts and shapes stay equal) and no
    super-batch crosses ranks. A global choice would all-gather every rank's k·B scores and move
    the chosen rows' pixels and embeddings between ranks every step, and could leave ranks with
    unequal shares. Each rank's super-batch goes to its teacher as one request (k·B samples).

    An epoch is one pass over the data in super-batches: k times fewer optimizer steps than
    without selection; `epochs` × k trains the same number of steps. `k` 1 (the default) is no
    selection at all.
    """

    score: str = "uniform"
    k: int = 1
    scope: str = "rank"

    @property
    def active(self) -> bool:
        """Whether steps draw super-batches (k > 1)."""
        return self.k > 1

    @property
    def needs_teacher(self) -> bool:
        """Whether the choice reads teacher scores (every score but uniform)."""
        return self.active and self.score != "uniform"

    def draw_size(self, batch_size: int) -> int:
        """Samples a rank draws per micro-batch: the super-batch."""
        return self.k * batch_size

    def validate(self, teacher: TeacherSourceConfig) -> None:
        """The fields, and what the run's teachers must give for `score`; errors name the field."""
        if self.score not in SELECTION_SCORES:
            raise ValueError(f"selection.score {self.score!r}: expected one of {SELECTION_SCORES}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"selection.k: expected an integer >= 1 (the super-batch is k × data.batch_size), "
                             f"got {self.k!r}")
        if self.scope not in SELECTION_SCOPES:
            raise ValueError(f"selection.scope {self.scope!r}: only {SELECTION_SCOPES} (each DDP rank chooses "
                             "from its own super-batch; a global choice would all-gather every step's super-batches)")
        if self.score != "uniform" and self.k == 1:
            raise ValueError(f"selection.score {self.score!r} with selection.k 1 keeps every sample it scores: "
                             "set k >= 2 (each step then draws k × data.batch_size samples and trains on the best "
                             "data.batch_size)")
        if self.needs_teacher and not teacher.has_teacher:
            raise ValueError(f"selection.score {self.score!r} is scored by the teacher, but teacher.mode is "
                             f"'{teacher.mode}': give the run a teacher, or use selection.score 'uniform'")
        routed = [m.name for m in teacher.members() if m.labels is not None]
        if self.needs_teacher and routed:
            raise ValueError(f"selection.score {self.score!r} averages every teacher's score of every sample, but "
                             f"teachers {routed} answer only their labels: drop their labels or the selection")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (CLIP-KD's recipe)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 20
    grad_clip_norm: float | None = None


@dataclass
class TrainConfig:
    """One student run. Reusing `run_name` with the same `storage_path` resumes it."""

    run_name: str = "student"
    storage_path: str = "./runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherSourceConfig = field(default_factory=TeacherSourceConfig)
    # loss name -> weight; left empty: CLIP alone without a teacher, DEFAULT_DISTILL_LOSSES with one
    losses: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # teacher-scored data selection
    epochs: int = 1
    max_steps_per_epoch: int | None = None
    accum_steps: int = 1  # micro-batches per optimizer step (exact for contrastive/distill losses)
    num_workers: int = 2
    use_gpu: bool = False
    # GPUs each worker reserves with use_gpu: a fraction shares one GPU with other workers or a
    # teacher replica (`ServingConfig.num_gpus`), e.g. 0.5 each for a teacher and a student on one card
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    worker_label_selector: dict = field(default_factory=dict)  # node labels workers need, e.g. {"kd-role": "student"}
    worker_resources: dict = field(default_factory=dict)  # custom resources per worker, e.g. {"kd_student": 1}
    write_roots: list = field(default_factory=list)  # if set (or $KD_WRITE_ROOTS), checkpoints/caches only under these
    torch_threads: int | None = 1
    cpu_affinity: list = field(default_factory=list)  # cores every worker is pinned to; empty: not pinned
    seed: int = 0
    log_every_steps: int = 10
    # Also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends), so a killed
    # worker or a stop for an absent teacher loses at most N steps; a resume starts at that step.
    checkpoint_every_steps: int = 0
    # Evaluate the student on data.val_shards every N optimizer steps and after the last one (0: off):
    # zero-shot top-1/5 and retrieval R@1, the run's evaluation curve (`student_trainer.step_eval`)
    eval_every_steps: int = 0
    max_failures: int = 2  # Ray Train restarts of the worker group from the last checkpoint (-1: unlimited)

    def validate(self) -> TrainConfig:
        """Fail early, with the offending field named, instead of deep inside a Ray worker."""
        if not _RUN_NAME.match(self.run_name):
            raise ValueError(f"run_name {self.run_name!r}: use letters, digits, '_', '.', '-' (max 128)")
        self._validate_teachers()
        self._validate_init()
        self.selection.validate(self.teacher)
        check_placement(self.worker_label_selector, self.worker_resources, "worker_label_selector", "worker_resources")
        check_cores(self.cpu_affinity)
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1] (a worker trains on one device), "
                             f"got {self.gpus_per_worker!r}")
        roots = write_roots(self.write_roots)
        check_under_roots(self.storage_path, roots, "storage_path")
        for member in self.teacher.members():
            if member.mode.writes_cache:
                check_under_roots(member.cache_path, roots, "teacher.cache_path")
        if self.data.num_views is not None and self.data.num_views < 1:
            raise ValueError(f"data.num_views must be >= 1 or None, got {self.data.num_views}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if not self.data.train_shards:
            raise ValueError("data.train_shards is empty: give a shard directory, glob or brace pattern")
        for name, value in [("epochs", self.epochs), ("num_workers", self.num_workers),
                            ("data.batch_size", self.data.batch_size), ("data.image_size", self.data.image_size)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.checkpoint_every_steps < 0 or self.max_failures < -1:
            raise ValueError(f"checkpoint_every_steps must be >= 0 and max_failures >= -1, got "
                             f"{self.checkpoint_every_steps} and {self.max_failures}")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps must be >= 0 (0: no evaluation curve), got {self.eval_every_steps}")
        if self.eval_every_steps and not self.data.val_shards:
            raise ValueError(f"eval_every_steps={self.eval_every_steps} evaluates on data.val_shards, which is "
                             "empty: give the test split's shards (--val-shards) or set eval_every_steps to 0")
        if not self.losses:
            self.losses = dict(DEFAULT_DISTILL_LOSSES) if self.teacher.has_teacher else {"clip": 1.0}
        if not any(w for w in self.losses.values()):
            raise ValueError(f"losses {self.losses!r}: at least one loss needs a nonzero weight")
        return self

    def _validate_teachers(self) -> None:
        """Every teacher's fields (each `teacher.sources` entry on its own), and an ensemble's names."""
        members = self.teacher.members()
        for i, member in enumerate(members):
            _validate_source(member, f"teacher.sources[{i}]." if self.teacher.sources else "teacher.")
        names = [m.name for m in members]
        bad = [n for n in names if self.teacher.sources and not _RUN_NAME.match(n)]
        if bad:
            raise ValueError(f"teacher.sources: name {bad[0]!r}: use letters, digits, '_', '.', '-' (max 128)")
        if len(set(names)) != len(names):
            raise ValueError(f"teacher.sources: names must differ, got {names} (give each entry a `name`)")
        if self.teacher.is_ensemble and not all(m.mode.gives_outputs for m in members):
            raise ValueError("teacher.sources: every entry of an ensemble needs a teacher mode other than 'none'")
        _check_shared_caches(members)
        if any(m.labels is not None for m in members) and not self.teacher.is_ensemble:
            raise ValueError("teacher labels (per-sample teacher choice) need several teacher.sources")

    def _validate_init(self) -> None:
        """The fields of weight inheritance that need nothing but the config (preflight checks the shapes)."""
        if self.model.inherit_layers not in INHERIT_LAYERS:
            raise ValueError(f"model.inherit_layers {self.model.inherit_layers!r}: expected one of {INHERIT_LAYERS}")
        if self.model.init_from_teacher and self.model.pretrained:
            raise ValueError(f"model.init_from_teacher and model.pretrained ({self.model.pretrained!r}) are both set: "
                             "the inherited weights would replace the pretrained ones; choose one")

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose local paths are absolute: Ray workers do not run in the driver's directory."""
        cfg = from_plain(TrainConfig, self.to_dict())
        cfg.storage_path = _absolute(cfg.storage_path)
        cfg.data.train_shards = _absolute(cfg.data.train_shards)
        cfg.data.val_shards = _absolute(cfg.data.val_shards)
        cfg.teacher.cache_path = _absolute(cfg.teacher.cache_path)
        if cfg.teacher.teacher is not None:
            cfg.teacher.teacher.pretrained = _absolute_if_exists(cfg.teacher.teacher.pretrained)
        for entry in cfg.teacher.sources:
            if isinstance(entry, dict) and entry.get("cache_path"):
                entry["cache_path"] = _absolute(entry["cache_path"])
            if isinstance(entry, dict) and isinstance(entry.get("teacher"), dict) and entry["teacher"].get("pretrained"):
                entry["teacher"]["pretrained"] = _absolute_if_exists(entry["teacher"]["pretrained"])
        return cfg

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_plain(cls, nest_teacher_configs(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> None:
        """Write atomically: a run started from this file never reads half of it."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _validate_source(t: TeacherSourceConfig, p: str) -> None:
    """One teacher's fields; errors name the field with prefix `p` ("teacher." or "teacher.sources[i].")."""
    if t.mode.loads_teacher and t.teacher is None:
        raise ValueError(f"{p}mode '{t.mode}' needs teacher.teacher (a TeacherConfig)")
    if t.send_pixels not in SEND_PIXELS:
        raise ValueError(f"{p}send_pixels {t.send_pixels!r}: expected one of {SEND_PIXELS}")
    if t.answer_dtype is not None and t.answer_dtype not in ANSWER_DTYPES:
        raise ValueError(f"{p}answer_dtype {t.answer_dtype!r}: expected one of {ANSWER_DTYPES} or null "
                         "(the pool's default)")
    if t.answer_dtype is not None and not t.mode.chooses_answer_dtype:
        why = ("reads rows in the dtype `kd precompute --answer-dtype` stored" if t.mode.gives_outputs
               else "gets no teacher answers")
        raise ValueError(f"{p}answer_dtype {t.answer_dtype!r}: mode '{t.mode}' {why}; set it for inline, remote "
                         "or hybrid teachers")
    if t.mode.reads_cache and not t.cache_path:
        raise ValueError(f"{p}mode '{t.mode}' needs teacher.cache_path")
    if t.cache_teacher is not None and not t.mode.cache_only:
        why = "uses its app's fingerprint" if t.mode.reads_cache else "reads no cache"
        raise ValueError(f"{p}cache_teacher picks the rows a 'cache' teacher reads; mode '{t.mode}' {why}")
    if t.prefetch < 0 or t.retries < 0:
        raise ValueError(f"{p}prefetch and {p}retries must be >= 0")
    if not t.patience_s >= 0:
        raise ValueError(f"{p}patience_s must be >= 0 seconds, got {t.patience_s!r}")
    if not (isinstance(t.weight, (int, float)) and 0 < t.weight <= 100):
        raise ValueError(f"{p}weight: expected a number in (0, 100], got {t.weight!r}")
    if isinstance(t.loss_weight, bool) or not isinstance(t.loss_weight, (int, float)) or not t.loss_weight > 0:
        raise ValueError(f"{p}loss_weight: expected a number > 0, got {t.loss_weight!r}")
    if t.labels is not None and (not isinstance(t.labels, list)
                                 or not all(isinstance(x, int) and not isinstance(x, bool) for x in t.labels)):
        raise ValueError(f"{p}labels: expected a list of class ids or null, got {t.labels!r}")


def _check_shared_caches(members: list[TeacherSourceConfig]) -> None:
    """Teachers may share a cache root (one set of rows per teacher fingerprint), but each must read
    its own rows: a `cache` teacher sharing a root names its teacher (`cache_teacher`), and no two
    name the same one. (Hybrid teachers are told apart by their apps' fingerprints.)"""
    shared: dict[str, list[TeacherSourceConfig]] = {}
    for m in members:
        if m.mode.reads_cache:
            shared.setdefault(os.path.normpath(os.path.expanduser(m.cache_path)), []).append(m)
    for root, users in shared.items():
        readers = [m for m in users if m.mode.cache_only]
        if len(users) < 2 or not readers:
            continue
        unnamed = [m.name for m in readers if not m.cache_teacher]
        if unnamed:
            raise ValueError(f"teacher.sources: teachers {[m.name for m in users]} share the embedding cache {root}; "
                             f"give each 'cache' teacher of it ({unnamed}) a cache_teacher (its fingerprint or model "
                             f"name, as `kd cache info {root}` lists them) so each reads its own rows")
        picks = [m.cache_teacher for m in readers]
        if len(set(picks)) != len(picks):
            raise ValueError(f"teacher.sources: teachers {[m.name for m in readers]} read the same teacher's rows "
                             f"of {root} (cache_teacher {picks}): give each its own")


def _absolute(path: str | None) -> str | None:
    """Absolute form of a local path or shard pattern; URLs (s3://, gs://, ...) stay as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_if_exists(path: str | None) -> str | None:
    """A pretrained value is a local checkpoint only when that file exists; else it is a tag."""
    return _absolute(path) if path and os.path.exists(os.path.expanduser(path)) else path


def nest_teacher_configs(data: Any) -> Any:
    """`data` with its teacher configs (`teacher.teacher`, `teacher.sources[i].teacher`) in the
    sectioned shape, and one deprecation warning for the whole run config when any used flat keys
    (`TeacherConfig.from_dict`). Done once per load: `members()` parses sources again and again."""
    teacher = data.get("teacher") if isinstance(data, dict) else None
    if not isinstance(teacher, dict):
        return data
    teacher, moved = dict(teacher), []
    if isinstance(teacher.get("teacher"), dict):
        teacher["teacher"], moved = nest_flat_keys(teacher["teacher"], "teacher.teacher.", "teacher.teacher")
    if isinstance(teacher.get("sources"), list):
        teacher["sources"] = list(teacher["sources"])
        for i, entry in enumerate(teacher["sources"]):
            if isinstance(entry, dict) and isinstance(entry.get("teacher"), dict):
                where = f"teacher.sources[{i}].teacher"
                nested, more = nest_flat_keys(entry["teacher"], f"{where}.", where)
                teacher["sources"][i], moved = {**entry, "teacher": nested}, moved + more
    warn_flat_keys(moved, "run config")
    return {**data, "teacher": teacher}


def to_plain(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, enums → their values, recursively (JSON/YAML friendly)."""
    if isinstance(obj, Enum):
        return obj.value
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, refusing unknown keys by their dotted name."""
    if data is None or dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config keys: {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for key, value in data.items():
        target = _dataclass_in(hints[key])
        path = f"{where}.{key}" if where else key
        if target is TeacherConfig and isinstance(value, dict):  # its own parser: sections, flat keys
            kwargs[key] = TeacherConfig.from_dict(value, where=path)
        elif target is not None and isinstance(value, dict):
            kwargs[key] = from_plain(target, value, path)
        elif hints[key] is TeacherMode:
            kwargs[key] = TeacherMode.parse(value, path)  # the error names the entry (teacher.sources[i].mode)
        elif key == "betas" and isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None

