"""The Ray Train loop: an open_clip student, DDP, AdamW + warmup/cosine, teacher outputs from a source.

Student and loss heads live in one `DistillModule` so DDP synchronises the projection heads with
the student. Checkpoints go through `ray.train.report`; rerunning the same run name resumes.

An optimizer step (`train_step`) consumes `accum_steps` per-worker batches and their teacher
outputs. With more than one, it uses `losses.accumulated_backward` (features cached per
micro-batch, one loss on the whole step batch, per-micro-batch recompute), so the update is the
one a single batch of `accum_steps * batch_size` would give, for the batch-coupled contrastive
and distillation losses too. Steps and the LR schedule count optimizer steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from teacher_service.affinity import pin_process
from teacher_service.cache.centroids import class_centroids, drawn_class_views
from teacher_service.contract.preprocess import PreprocessSpec, preprocess_spec, to_model_input
from teacher_service.contract.protocol import EmbedRequest, TeacherUnavailableError
from teacher_service.private_files import make_private_dir, private_umask
from teacher_service.contract.augment import view_namespace, view_recipe

from student_trainer.checkpoint import (
    COMMAND_KEY,
    MODEL_FILE,
    PROVENANCE_FILE,
    check_same_teacher,
    provenance,
    read_provenance,
    driver_command,
    save_student,
)
from student_trainer.config import TrainConfig
from student_trainer.data.batches import Batch, steps_per_epoch, train_batches
from teacher_service.shards import SkipCounts, load_dataset_info, resolve_shards
from student_trainer.distributed import average_gradients, sum_over_ranks
from student_trainer.events import EVAL_METRICS, RunEvents, tensorboard_dir
from student_trainer.factory import create_student, create_tokenizer, embed_dim, student_shape
from student_trainer.losses import (OPTION_DEFAULTS, LossSet, accumulated_backward, build_losses,
                                    losses_needing_teacher)
from student_trainer.masking import encode_image_masked, patch_noise
from student_trainer.profile import StepProfile
from student_trainer.progress import (VERBOSE_KEY, ProgressPoster, StepSnapshot, format_summary,
                                      quiet_worker_console, watch_run)
from student_trainer.scheduler import set_lr, warmup_cosine
from student_trainer.selection import Selector, student_row_losses
from student_trainer.step_eval import StepEvaluator
from student_trainer.teacher.outputs import merge_outputs
from student_trainer.teacher.sources import NoTeacher, TeacherSource, make_teacher_source

TRAIN_STATE_FILE = "train_state.pt"
# The run's cumulative clocks, kept in every checkpoint so a resumed run's curve goes on counting:
# samples seen (all ranks: drawn from the data and answered by the teacher), samples trained on (the
# same, but with data selection only the kept rows), training wall time without evaluations,
# teacher-seconds (all ranks, docs/design.md) and evaluation seconds.
RUN_CLOCKS = ("samples_seen", "samples_trained", "train_wall_s", "teacher_s", "eval_s")
log = logging.getLogger(__name__)
_MAX_LOGIT_SCALE = math.log(100.0)


class DistillModule(torch.nn.Module):
    """Student + loss heads: forward(batch tensors, teacher outputs) -> {"<name>_loss": tensor}."""

    def __init__(self, student: torch.nn.Module, losses: LossSet, spec: PreprocessSpec) -> None:
        super().__init__()
        self.student = student
        self.losses = losses
        self.spec = spec

    def features(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                 mask_noise: torch.Tensor | None = None) -> dict:
        """The student dict the losses read (MFD's masked view included when MFD is on).

        `mask_noise` [B, patches] fixes MFD's mask (see `masking.patch_noise`); without it the
        mask is drawn from the global RNG, which accumulation cannot replay.
        """
        dtype = self.student.logit_scale.dtype
        pixels = to_model_input(images, self.spec, device=images.device, dtype=dtype)
        student = {
            "image_features": self.student.encode_image(pixels, normalize=True),
            "text_features": self.student.encode_text(tokens, normalize=True),
            "logit_scale": self.student.logit_scale.exp(),
            "labels": labels,
        }
        if getattr(self.student, "logit_bias", None) is not None:
            student["logit_bias"] = self.student.logit_bias
        if self.losses.mask_ratio:
            student["masked_image_features"] = encode_image_masked(
                self.student, pixels, self.losses.mask_ratio, noise=mask_noise)
        return student

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                teacher: dict | None, mask_noise: torch.Tensor | None = None) -> dict:
        return self.losses(self.features(images, tokens, labels, mask_noise), teacher or {})


def mask_seed(seed: int, step: int, rank: int) -> int:
    """MFD mask seed of one optimizer step on one rank: a pure function, so a resumed or
    re-run step draws the same masks, and ranks draw different ones."""
    digest = hashlib.sha256(f"mfd\x00{seed}\x00{step}\x00{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8, tokens, labels


def train_step(
    module: DistillModule,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    teacher: dict | None,
    *,
    seed: int = 0,
    ddp: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip_norm: float | None = None,
    use_amp: bool = False,
    where: str = "",
) -> dict[str, torch.Tensor]:
    """One optimizer step on `micro_batches` (k ≥ 1 of b rows each); detached loss parts + "loss".

    `teacher` holds the outputs for all k·b rows (as tensors, see `TeacherOutputs.to_tensors`). k = 1 is
    the plain DDP step; k > 1 accumulates exactly (`losses.accumulated_backward`) inside
    `ddp.no_sync()` and averages the gradients across ranks itself. MFD's mask noise for the
    k·b rows comes from `seed`, sliced per micro-batch, so the masks do not depend on k.
    Raises FloatingPointError, before the weights change, on a non-finite loss.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    device = micro_batches[0][0].device
    sizes = [int(mb[0].shape[0]) for mb in micro_batches]
    noise = patch_noise(module.student, sum(sizes), seed, device) if module.losses.mask_ratio else None
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    optimizer.zero_grad(set_to_none=True)
    if len(micro_batches) == 1:
        with torch.autocast(device.type, enabled=use_amp):
            parts = (ddp or module)(*micro_batches[0], teacher, noise)
            loss = sum(v for k, v in parts.items() if k.endswith("_loss"))
        _check_finite(loss, parts, where)
        scaler.scale(loss).backward()
        parts = {k: v.detach() for k, v in parts.items()}
        parts["loss"] = loss.detach()
    else:
        parts = _accumulated(module, micro_batches, sizes, noise, teacher, ddp, scaler, use_amp)
        _check_finite(parts["loss"], parts, where)
    if grad_clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        module.student.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
    return parts


def _accumulated(module: DistillModule, micro_batches: Sequence[MicroBatch], sizes: list[int],
                 noise: torch.Tensor | None, teacher: dict | None, ddp, scaler,
                 use_amp: bool) -> dict[str, torch.Tensor]:
    device = micro_batches[0][0].device
    offsets = [0, *itertools.accumulate(sizes)]
    factor = scaler.get_scale() if scaler.is_enabled() else 1.0  # fp16 AMP: scale like scaler.scale(loss)

    def forward_micro(j: int) -> dict:
        rows = None if noise is None else noise[offsets[j]:offsets[j + 1]]
        with torch.autocast(device.type, enabled=use_amp):
            return module.features(*micro_batches[j], rows)

    def scaled_losses(student: dict, teacher_: dict | None) -> dict:
        with torch.autocast(device.type, enabled=use_amp):
            return {k: v * factor for k, v in module.losses(student, teacher_ or {}).items()}

    no_sync = ddp.no_sync() if hasattr(ddp, "no_sync") else contextlib.nullcontext()
    with no_sync:
        values = accumulated_backward(scaled_losses, forward_micro, len(micro_batches), teacher)
    average_gradients(p for p in module.parameters() if p.requires_grad)
    return {k: v / factor for k, v in values.items()}


def _check_finite(loss: torch.Tensor, parts: dict, where: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss{' at ' + where if where else ''}: "
                                 f"{ {k: float(v) for k, v in parts.items()} }")


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass(frozen=True)
class Position:
    """Where a run stands: the epoch to train next, the optimizer steps of it already trained, and
    the global optimizer step. Saved in every checkpoint; a resume starts exactly there."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0


@dataclass
class Resume:
    """The latest Ray Train checkpoint, read before the model is built: its position decides which
    epoch's stream opens first, so that epoch's first teacher answers arrive while the model is
    built; `load_into` then restores the weights and the optimizer."""

    position: Position
    recorded: dict  # the checkpoint's provenance
    model_state: dict
    train_state: dict

    @property
    def clocks(self) -> dict:
        """The run's `RUN_CLOCKS` at the checkpoint (empty from a checkpoint written before them)."""
        return dict(self.train_state.get("clocks") or {})

    def load_into(self, module: DistillModule, optimizer: torch.optim.Optimizer) -> None:
        module.student.load_state_dict(self.model_state)
        module.losses.load_state_dict(self.train_state["losses"])
        optimizer.load_state_dict(self.train_state["optimizer"])


def _read_checkpoint(fingerprint: str, allow_change: bool = False) -> Resume | None:
    """The latest Ray Train checkpoint, if any. A run resumed against another teacher would
    silently mix two teachers' targets: refused here, before anything is built."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        model_state = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        recorded = read_provenance(d)
    recorded = recorded or {"teacher": {"fingerprint": state.get("teacher_fingerprint", "")}}
    check_same_teacher(recorded, fingerprint, "this run's checkpoint", allow_change)
    if "next_epoch" not in state:  # written at epoch ends only, before mid-epoch checkpoints existed
        position = Position(int(state["epoch"]) + 1, 0, int(state["step"]))
    else:
        position = Position(int(state["next_epoch"]), int(state["next_epoch_step"]), int(state["step"]))
    return Resume(position, recorded, model_state, state)


def _initialise(student: torch.nn.Module, cfg: TrainConfig) -> dict | None:
    """How a fresh run's weights start, for the provenance: inherited from the teacher when
    `model.init_from_teacher` (TinyCLIP), else random or pretrained as created. A resumed run
    (None here) takes its weights and this record from its checkpoint, so it loads no teacher."""
    import ray.train

    if ray.train.get_checkpoint() is not None:
        return None
    if cfg.model.init_from_teacher:
        from student_trainer.inherit import inherit_from_teacher

        return inherit_from_teacher(student, cfg)
    return {"from": "pretrained", "pretrained": cfg.model.pretrained} if cfg.model.pretrained else {"from": "random"}


def _report(metrics: dict, module: DistillModule, optimizer, cfg: TrainConfig, position: Position,
            init: dict | None = None, command: str | None = None) -> None:
    """Report `metrics` on every rank; rank 0 adds a checkpoint that resumes at `position` (its
    provenance keeps `init`, how the student's weights started, and the run's `command`)."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_student(module.student, cfg.model, d)
        torch.save({"losses": module.losses.state_dict(), "optimizer": optimizer.state_dict(),
                    "next_epoch": position.epoch, "next_epoch_step": position.epoch_step,
                    "step": position.step, "clocks": {k: metrics[k] for k in RUN_CLOCKS if k in metrics},
                    "teacher_fingerprint": metrics["teacher_fingerprint"]}, Path(d) / TRAIN_STATE_FILE)
        (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        teacher = {"fingerprint": metrics["teacher_fingerprint"], "model": metrics.get("teacher_model")}
        (Path(d) / PROVENANCE_FILE).write_text(json.dumps(provenance(cfg, teacher, init, command), indent=2, default=str))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _until_unavailable(groups: Iterable[list]) -> Iterator[tuple[list | None, TeacherUnavailableError | None]]:
    """`(group, None)` per optimizer step, then `(None, error)` if the teacher is lost for good, so
    the loop can checkpoint where it stands instead of dying mid-epoch."""
    try:
        for group in groups:
            yield group, None
    except TeacherUnavailableError as exc:
        yield None, exc


def _raising(error: Exception) -> Iterator:
    """A stream that raises `error` at its first item: an epoch whose stream could not be opened
    ahead fails where a lazy stream would, at its first step, after the previous epoch's
    checkpoint (a lost teacher there checkpoints and stops, as at any step)."""
    raise error
    yield  # unreachable: makes this a generator, so the error waits for the first next()


def _every_rank_ok(ok: bool, world: int, device: torch.device) -> bool:
    """True when `ok` holds on every rank: the ranks stop at the same step or not at all (a rank
    that stopped alone would leave the others waiting in DDP's all-reduce)."""
    if world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _as_tensors(batch: Batch, device: torch.device) -> MicroBatch:
    return (torch.from_numpy(batch.images).to(device),
            torch.from_numpy(batch.tokens).to(device),
            torch.from_numpy(batch.labels).to(device))


# --------------------------------------------------------------------------- Embed-KD centroids
def teacher_image_embedder(source, run: str) -> Callable[[np.ndarray], np.ndarray]:
    """`images uint8 [n, H, W, 3] -> image embeddings [n, D]` through the run's teacher source.

    Inline sources embed with their engine, remote ones over their Serve handle (one request per
    call, the source's timeout). Keys are content hashes of the images, so a keyed cache can never
    confuse them with training samples. The rows are asked in fp16 whatever the run's or the pool's
    answer dtype: a centroid is a mean over many of them, computed once.
    """
    def request(images: np.ndarray) -> EmbedRequest:
        keys = ["centroid-" + hashlib.sha1(img.tobytes()).hexdigest()[:20] for img in images]
        return EmbedRequest(keys=keys, images=np.ascontiguousarray(images), run=run, answer_dtype="fp16")

    source = getattr(source, "remote", None) or source  # hybrid: cache misses go to its remote pool
    if getattr(source, "engine", None) is not None:
        return lambda images: source.engine.embed(request(images)).image_features
    if getattr(source, "handle", None) is not None:
        timeout = float(getattr(getattr(source, "cfg", None), "timeout_s", 60.0))
        return lambda images: source.handle.embed.remote(request(images)).result(
            timeout_s=timeout).image_features
    raise ValueError(f"embed_kd class centroids need an inline, remote or hybrid teacher to compute them, "
                     f"got a {type(source).__name__} source; or give loss_options.class_centroids")


def _num_classes(options: dict, shards: list[str]) -> int:
    if options.get("num_classes"):
        return int(options["num_classes"])
    try:
        names = load_dataset_info(shards)["class_names"]
    except FileNotFoundError:
        names = []
    if not names:
        raise ValueError("embed_kd needs loss_options.num_classes (no class_names in the shards' dataset.json)")
    return len(names)


def embed_kd_centroids(cfg: TrainConfig, source, tokenizer, shards: list[str]) -> tuple[int, np.ndarray]:
    """(num_classes, float32 [C, D_t] centroids) from the teacher over `centroid_samples` center
    views per class drawn from the train shards with the run's seed (the paper's N random samples).
    Computed on rank 0 and broadcast, so every rank holds the identical buffer and the teacher
    embeds each sample once."""
    import torch.distributed as dist

    options = {**OPTION_DEFAULTS, **cfg.loss_options}
    num_classes = _num_classes(options, shards)
    per_class = int(options["centroid_samples"])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    payload: list = [None]
    if not distributed or dist.get_rank() == 0:
        _, labels, views = drawn_class_views(shards, per_class, cfg.seed, cfg.data.image_size)
        limit = int(getattr(source, "info", {}).get("max_request_samples", 256) or 256)
        payload[0] = class_centroids(teacher_image_embedder(source, cfg.run_name), views, labels,
                                     num_classes, batch_size=min(256, limit))
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    return num_classes, payload[0]


def _loss_options(cfg: TrainConfig, source, tokenizer, shards: list[str]) -> dict:
    """cfg.loss_options, plus Embed-KD centroids when embed_kd has none given: those a cache holds
    (`kd precompute --class-centroids`), else computed by a source that runs a teacher."""
    options = {k: v for k, v in cfg.loss_options.items()}
    if not cfg.losses.get("embed_kd") or options.get("class_centroids") is not None:
        return options
    cached = source.centroids() if hasattr(source, "centroids") else None
    if cached is not None:
        num_classes, centroids = len(cached), cached
    elif source.computes_centroids:
        num_classes, centroids = embed_kd_centroids(cfg, source, tokenizer, shards)
    else:
        from student_trainer.preflight import centroids_missing

        raise ValueError(centroids_missing(cfg))
    options["num_classes"] = num_classes
    options["class_centroids"] = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    return options


# --------------------------------------------------------------------------- the loop
def _grouped(stream: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of `size` items (the micro-batches of one optimizer step)."""
    iterator = iter(stream)
    while group := list(itertools.islice(iterator, size)):
        if len(group) < size:
            raise RuntimeError(f"the batch stream ended inside an optimizer step ({len(group)} of {size})")
        yield group


def optimizer_steps_per_epoch(cfg: TrainConfig, shards: list[str], world: int) -> int:
    """Optimizer steps per epoch: per-rank batches // accum_steps, capped by max_steps_per_epoch;
    with data selection a batch is a super-batch (`SelectionConfig.draw_size`)."""
    batches = steps_per_epoch(shards, world_size=world, batch_size=cfg.selection.draw_size(cfg.data.batch_size))
    steps = batches // cfg.accum_steps
    if steps == 0:
        raise ValueError(f"accum_steps={cfg.accum_steps} needs that many batches per rank, but an epoch has "
                         f"{batches} batches of {cfg.data.batch_size} per rank (world size {world})")
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


@dataclass(frozen=True)
class Worker:
    """This Ray Train worker: the run's configuration, its rank among `world` ranks, its device."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    command: str | None = None  # the driver's command line, for the checkpoints' provenance


def _start_worker(config: dict) -> Worker:
    """This worker, its process set up: console, file modes, cores, threads and the seed. `config`
    is `TrainConfig.to_dict()` plus the driver's console choice under `VERBOSE_KEY` and its command
    line under `COMMAND_KEY`."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in (VERBOSE_KEY, COMMAND_KEY)})
    if not config.get(VERBOSE_KEY, True):
        quiet_worker_console()
    private_umask()  # checkpoints this worker writes (and Ray Train copies to storage) are owner-only
    ctx = ray.train.get_context()
    pin_process(cfg.cpu_affinity)  # e.g. students on other cores than a teacher on the same machine
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    return Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                  config.get(COMMAND_KEY))


def _teacher_source(worker: Worker, shards: list[str]) -> TeacherSource:
    """The run's teacher source, its augmentation views named by the recipe and the shards."""
    cfg = worker.cfg
    recipe = view_recipe(cfg.data.image_size, cfg.seed)
    return make_teacher_source(cfg.teacher, run=cfg.run_name, device=str(worker.device), recipe=recipe,
                               view_namespace=view_namespace(recipe, "\n".join(sorted(shards))),
                               scores=cfg.selection.needs_teacher)


@dataclass
class EpochReader:
    """Opens an epoch's optimizer-step groups on this rank: its batches with their teacher outputs
    (`source` is `NoTeacher` when no loss needs them per batch)."""

    worker: Worker
    shards: list[str]
    tokenizer: Callable
    source: TeacherSource
    steps: int  # optimizer steps per epoch

    def open(self, epoch: int, first: int) -> tuple[Iterator[list], SkipCounts]:
        """The epoch's optimizer-step groups from step `first` on, its first prefetch window already
        sent to a pool (`TeacherSource.stream(eager=True)`), and its bad-sample counts (filled as
        it is read). With data selection each batch is a super-batch, chosen from in the loop."""
        cfg, skips = self.worker.cfg, SkipCounts()
        batches = train_batches(self.shards, rank=self.worker.rank, world_size=self.worker.world,
                                batch_size=cfg.selection.draw_size(cfg.data.batch_size),
                                image_size=cfg.data.image_size, epoch=epoch,
                                seed=cfg.seed, tokenizer=self.tokenizer, shuffle_buffer=cfg.data.shuffle_buffer,
                                view=cfg.data.view_of(epoch), start_batch=first * cfg.accum_steps, skips=skips)
        batches = itertools.islice(batches, (self.steps - first) * cfg.accum_steps)
        try:
            stream = self.source.stream(batches, view=cfg.data.view_of(epoch), eager=True)
        except Exception as error:  # noqa: BLE001 - raised at the epoch's first step, after the last checkpoint
            stream = _raising(error)
        return _grouped(stream, cfg.accum_steps), skips


def _build_module(worker: Worker, source: TeacherSource, options: dict, needs_teacher: bool,
                  resume: Resume | None) -> tuple[DistillModule, torch.optim.Optimizer, dict | None]:
    """The student (created, then its weights inherited, or a resume's loaded) and the run's losses
    in one `DistillModule`, its AdamW, and how the student's weights started (for the provenance)."""
    cfg = worker.cfg
    student = create_student(cfg.model, worker.device)
    init = resume.recorded.get("init") if resume is not None else _initialise(student, cfg)
    centroids = options.get("class_centroids")
    teacher_dim = source.embed_dim or (int(centroids.shape[1]) if centroids is not None else embed_dim(student))
    losses = build_losses(cfg.losses, student_dim=embed_dim(student), teacher_dim=teacher_dim, options=options,
                          teacher_dims=getattr(source, "embed_dims", None))  # several: one head per teacher
    if losses.needs_teacher != needs_teacher:
        raise RuntimeError(f"losses {cfg.losses}: the built set says needs_teacher={losses.needs_teacher}, "
                           f"losses_needing_teacher said {needs_teacher}")
    module = DistillModule(student, losses, preprocess_spec(student)).to(worker.device)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if resume is not None:
        resume.load_into(module, optimizer)
    return module, optimizer, init


@dataclass
class EpochTally:
    """One epoch as it trains: the step it started at (inside the epoch when resumed), its
    bad samples by reason (summed over ranks when reported), when it started, where its steps'
    time went, and its loss sums."""

    epoch: int
    first: int
    skips: SkipCounts
    started: float
    profile: StepProfile
    sums: dict[str, float] = field(default_factory=dict)
    eval_s: float = 0.0  # evaluation time inside the epoch, kept off its time and throughput


@dataclass
class WorkerLoop:
    """What one worker's loop carries across epochs: the model, its optimizer and DDP wrapper, the
    teacher source, where the run started (`start`) and stands (`step`, `samples_done`), and where
    it reports (the rank's event file and progress line)."""

    worker: Worker
    source: TeacherSource
    steps: int  # optimizer steps per epoch
    start: Position
    module: DistillModule
    optimizer: torch.optim.Optimizer
    ddp: torch.nn.Module
    init: dict | None  # how the student's weights started, for the provenance
    can_lose_teacher: bool  # the ranks agree every step whether the teacher answered (one tiny all-reduce)
    use_amp: bool
    scaler: torch.amp.GradScaler
    started: float
    step: int
    events: RunEvents
    progress: ProgressPoster
    evaluator: StepEvaluator | None = None  # the evaluation curve (`eval_every_steps`)
    base: dict = field(default_factory=dict)  # the run's `RUN_CLOCKS` at the resumed checkpoint
    selector: Selector | None = None  # data selection (`SelectionConfig.k` > 1): rows chosen from super-batches
    samples_drawn: int = 0  # this process's samples seen, all ranks (super-batches with selection)
    samples_done: int = 0  # this process's samples trained on, all ranks
    eval_s: float = 0.0  # this process's evaluation seconds

    @classmethod
    def create(cls, worker: Worker, source: TeacherSource, steps: int, resume: Resume | None, options: dict,
               needs_teacher: bool, tokenizer: Callable) -> WorkerLoop:
        """Build the model (`_build_module`), wrap it in DDP, and start the run's clocks and reports
        (and its evaluation curve, with `eval_every_steps`)."""
        import ray.train.torch

        module, optimizer, init = _build_module(worker, source, options, needs_teacher, resume)
        ddp = ray.train.torch.prepare_model(module)
        start = resume.position if resume is not None else Position()
        use_amp = worker.device.type == "cuda"
        cfg = worker.cfg
        events = RunEvents.for_rank(cfg.storage_path, cfg.run_name, worker.rank)
        progress = ProgressPoster.for_rank(cfg.run_name, worker.rank)
        return cls(worker, source, steps, start, module, optimizer, ddp, init,
                   can_lose_teacher=(needs_teacher or cfg.selection.needs_teacher) and source.can_lose_teacher,
                   use_amp=use_amp,
                   scaler=torch.amp.GradScaler("cuda", enabled=use_amp), started=time.perf_counter(),
                   step=start.step, events=events, progress=progress,
                   evaluator=_evaluator(worker, tokenizer, events, progress, start.step),
                   base=resume.clocks if resume is not None else {},
                   selector=Selector(cfg.selection, cfg.data.batch_size) if cfg.selection.active else None)

    def train_epoch(self, epoch: int, groups: Iterator[list], skips: SkipCounts) -> dict | None:
        """Train `epoch` (from the resumed step in the run's first); its metrics, or None when the
        teacher was lost and the run stopped, checkpointed at the first step not trained."""
        first = self.start.epoch_step if epoch == self.start.epoch else 0
        tally = EpochTally(epoch, first, skips, time.perf_counter(), StepProfile(lambda: self.source.stats.wait_s))
        self.ddp.train()
        for i, (group, lost) in enumerate(tally.profile.iterate(_until_unavailable(groups)), start=first):
            if lost is not None and not self.can_lose_teacher:
                raise lost
            if self.can_lose_teacher and not _every_rank_ok(lost is None, self.worker.world, self.worker.device):
                self._stop(lost, tally, i)
                return None
            parts = self._train_step(tally, i, group)
            self._after_step(tally, i, parts)
        return self.metrics(tally, self.steps)

    def _train_step(self, tally: EpochTally, i: int, group: list) -> dict[str, torch.Tensor]:
        """Optimizer step `i` of the epoch on `group` (its micro-batches and their teacher outputs)
        at the scheduled LR; its losses are added to the epoch's sums."""
        cfg, device = self.worker.cfg, self.worker.device
        set_lr(self.optimizer, warmup_cosine(self.step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                                             total_steps=self.steps * cfg.epochs))
        self.samples_drawn += sum(len(b.keys) for b, _ in group) * self.worker.world
        if self.selector is not None:
            with tally.profile.part("select"):
                group = [self.selector.choose(b, t, self._student_scores) for b, t in group]
        with tally.profile.part("convert"):
            merged = merge_outputs([t for _, t in group])  # one teacher's or an ensemble's
            teacher = merged.to_tensors(device) if merged is not None else None
            micro_batches = [_as_tensors(b, device) for b, _ in group]
        with tally.profile.part("compute"):
            parts = train_step(self.module, self.optimizer, micro_batches, teacher,
                               seed=mask_seed(cfg.seed, self.step, self.worker.rank), ddp=self.ddp,
                               scaler=self.scaler, grad_clip_norm=cfg.optim.grad_clip_norm, use_amp=self.use_amp,
                               where=f"epoch {tally.epoch} step {i}")
        self.step += 1
        self.samples_done += sum(len(b.keys) for b, _ in group) * self.worker.world
        for k, v in parts.items():
            tally.sums[k] = tally.sums.get(k, 0.0) + float(v)
        return parts

    def _student_scores(self, batch: Batch) -> np.ndarray:
        """The student's per-row loss on a super-batch (learnability), without gradients."""
        images, tokens, _ = _as_tensors(batch, self.worker.device)
        return student_row_losses(self.module.student, self.module.spec, images, tokens, self.use_amp)

    def _after_step(self, tally: EpochTally, i: int, parts: dict) -> None:
        """Rank 0's progress line and event record, its console line every `log_every_steps`, and a
        checkpoint every `checkpoint_every_steps` (the epoch's last step has the epoch's)."""
        cfg = self.worker.cfg
        if self.worker.rank == 0:
            snapshot = self._snapshot(parts, Position(tally.epoch, i + 1, self.step))
            self.events.step(snapshot)
            self.progress.post(snapshot)
            if cfg.log_every_steps and self.step % cfg.log_every_steps == 0:  # console with --verbose
                log.info("[%s] epoch %d/%d step %d/%d loss %.4f", cfg.run_name, tally.epoch + 1, cfg.epochs, i + 1,
                         self.steps, float(parts["loss"]))
        last = tally.epoch == cfg.epochs - 1 and i + 1 == self.steps  # the run's last step: its final point
        if self.evaluator is not None and (self.evaluator.due(self.step) or last):
            self._evaluate(tally)
        if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 and i + 1 < self.steps:
            metrics = self.metrics(tally, i + 1)
            self.events.report(self.step, metrics)
            self.checkpoint(metrics, Position(tally.epoch, i + 1, self.step))

    def _evaluate(self, tally: EpochTally) -> None:
        """A point of the evaluation curve, at this step on every rank (a collective); its time is
        kept off the training clock, the epoch's time and the step profile."""
        started = time.perf_counter()
        with tally.profile.aside():
            self.evaluator.evaluate(self.module.student, self.clocks(tally.epoch))
        spent = time.perf_counter() - started
        self.eval_s += spent
        tally.eval_s += spent

    def train_wall_s(self) -> float:
        """This process's training time so far, evaluations left out."""
        return time.perf_counter() - self.started - self.eval_s

    def clocks(self, epoch: int) -> dict:
        """Where the run stands, over every rank and resume: the step, the epoch (1-based), samples
        seen, training wall time and teacher-seconds (`curves.CURVE_CLOCKS`). A collective."""
        teacher_s = sum_over_ranks({"teacher_s": float(self.source.stats.compute_s)}, self.worker.device)["teacher_s"]
        trained_before = self.base.get("samples_trained", self.base.get("samples_seen", 0))  # older: no selection
        return {"step": self.step, "epoch": epoch + 1,
                "samples_seen": int(self.base.get("samples_seen", 0)) + self.samples_drawn,
                "samples_trained": int(trained_before) + self.samples_done,
                "train_wall_s": round(float(self.base.get("train_wall_s", 0.0)) + self.train_wall_s(), 4),
                "teacher_s": round(float(self.base.get("teacher_s", 0.0)) + teacher_s, 6)}

    def _snapshot(self, parts: dict, at: Position) -> StepSnapshot:
        """Rank 0's view after an optimizer step, for the progress line and the event file (`at`: the
        epoch, the steps of it trained, the global step)."""
        cfg, elapsed_s = self.worker.cfg, time.perf_counter() - self.started
        return StepSnapshot(
            step=at.step, total_steps=self.steps * cfg.epochs, start_step=self.start.step, epoch=at.epoch + 1,
            epochs=cfg.epochs, epoch_step=at.epoch_step, steps=self.steps, elapsed_s=round(elapsed_s, 3),
            samples_per_s=round(self.samples_done / max(self.train_wall_s(), 1e-9), 3),
            teacher_wait_s=round(self.source.stats.wait_s, 4), lr=float(self.optimizer.param_groups[0]["lr"]),
            logit_scale=float(self.module.student.logit_scale.detach().exp()),
            losses={k: float(v) for k, v in parts.items() if k == "loss" or k.endswith("_loss")})

    def metrics(self, tally: EpochTally, done: int) -> dict:
        """What is reported after `done` steps of the epoch: loss means over the steps trained, the
        teacher's and the profile's figures, bad samples summed over ranks (a collective: every rank
        calls this at the same step), throughput and memory."""
        cfg, world, device = self.worker.cfg, self.worker.world, self.worker.device
        elapsed, trained = time.perf_counter() - tally.started - tally.eval_s, done - tally.first
        metrics = {k: v / max(1, trained) for k, v in tally.sums.items()}
        metrics.update(self.source.stats.as_metrics())
        metrics.update(tally.profile.as_metrics())
        metrics.update(sum_over_ranks(tally.skips.as_metrics(), device))
        metrics.update({
            "epoch": tally.epoch + 1, "epoch_step": done, "step": self.step, "resumed_from_step": self.start.step,
            "epoch_time_s": round(elapsed, 3), "accum_steps": cfg.accum_steps,
            "train_samples_per_s": round(trained * cfg.accum_steps * cfg.data.batch_size * world
                                         / max(elapsed, 1e-9), 3),
            "run_samples_per_s": round(self.samples_done / max(self.train_wall_s(), 1e-9), 3),
            "world_size": world, "teacher_mode": self.source.mode,
            "teacher_fingerprint": self.source.info.get("fingerprint", ""),
            "teacher_model": self.source.info.get("model"), "peak_rss_mb": round(_peak_rss_mb(), 1),
        })
        if device.type == "cuda":
            metrics["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        metrics.update(self.clocks(tally.epoch))
        metrics["eval_s"] = round(float(self.base.get("eval_s", 0.0)) + self.eval_s, 4)
        return {**metrics, **self._selection_metrics(), **self._curve_metrics()}

    def _selection_metrics(self) -> dict:
        """What data selection cost since this worker started, all ranks (a collective): the
        teacher-seconds of the super-batches (their answers' and any scoring done here), the student's
        scoring seconds, the answers' bytes; rank 0's mean score of the rows drawn and kept."""
        if self.selector is None:
            return {}
        stats, cfg = self.selector.stats, self.worker.cfg.selection
        summed = sum_over_ranks({"selection_teacher_s": float(self.source.stats.compute_s) + stats.teacher_s,
                                 "selection_student_s": float(stats.student_s),
                                 "selection_bytes": int(stats.answer_bytes)}, self.worker.device)
        return {"selection_score": cfg.score, "selection_k": cfg.k,
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in summed.items()},
                **stats.score_means()}

    def _curve_metrics(self) -> dict:
        """The evaluation curve so far (`eval_curve`), and its figures at the top level when its
        last point is at this step (a report at another step has none of its own)."""
        points = self.evaluator.points if self.evaluator is not None else []
        if not points:
            return {}
        now = {k: v for k, v in points[-1].items() if k in EVAL_METRICS} if points[-1]["step"] == self.step else {}
        return {**now, "eval_curve": list(points)}

    def checkpoint(self, metrics: dict, position: Position) -> None:
        """Report `metrics`; rank 0 adds a checkpoint that resumes at `position`."""
        _report(metrics, self.module, self.optimizer, self.worker.cfg, position, self.init, self.worker.command)

    def _stop(self, lost: TeacherUnavailableError | None, tally: EpochTally, i: int) -> None:
        """The teacher is lost (here, or on another rank when `lost` is None): checkpoint at step `i`
        of the epoch, the first not trained, and report why the run stops."""
        metrics = self.metrics(tally, i)
        self.events.report(self.step, metrics)
        self.events.close()
        _stop_for_teacher(lost, metrics, self.module, self.optimizer, self.worker.cfg,
                          Position(tally.epoch, i, self.step), self.init, self.worker.command)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker. `config` is `TrainConfig.to_dict()`, plus the driver's
    console choice under `VERBOSE_KEY` (absent: verbose, as a hand-built trainer expects) and its
    command line under `COMMAND_KEY` (for the checkpoints' provenance).

    Set-up (the teacher source, the latest checkpoint, the loss options) comes before the first
    epoch's stream opens, and the model is built (`WorkerLoop.create`) after it; each epoch trains
    (`WorkerLoop.train_epoch`), reports, opens the next epoch's stream and writes its checkpoint."""
    worker = _start_worker(config)
    cfg = worker.cfg
    tokenizer = create_tokenizer(student_shape(cfg.model), cfg.model)  # the real model is created below
    shards = resolve_shards(cfg.data.train_shards)
    source = _teacher_source(worker, shards)
    resume = _read_checkpoint(source.info.get("fingerprint", ""), cfg.teacher.allow_teacher_change)
    start = resume.position if resume is not None else Position()
    options = _loss_options(cfg, source, tokenizer, shards)
    # losses that need no per-batch teacher output (clip, siglip, embed_kd with its centroids)
    # do not ask the teacher for every batch, unless data selection scores with it
    needs_teacher = bool(losses_needing_teacher(cfg.losses, options.get("class_centroids") is not None))
    asks_teacher = needs_teacher or cfg.selection.needs_teacher
    reader = EpochReader(worker, shards, tokenizer, source if asks_teacher else NoTeacher(),
                         optimizer_steps_per_epoch(cfg, shards, worker.world))
    # the first epoch's first answers are computed while the student is created (its weights loaded
    # or inherited) and the module, optimizer and DDP are built
    upcoming = reader.open(start.epoch, start.epoch_step) if start.epoch < cfg.epochs else None
    loop = WorkerLoop.create(worker, source, reader.steps, resume, options, needs_teacher, tokenizer)
    for epoch in range(start.epoch, cfg.epochs):
        groups, skips = upcoming
        metrics = loop.train_epoch(epoch, groups, skips)
        if metrics is None:
            return  # the teacher was lost: checkpointed and reported; the driver raises why
        loop.events.report(loop.step, metrics)
        # the next epoch's first answers are computed while this epoch's checkpoint is written
        upcoming = reader.open(epoch + 1, 0) if epoch + 1 < cfg.epochs else None
        loop.checkpoint(metrics, Position(epoch + 1, 0, loop.step))
    loop.events.close()


def _evaluator(worker: Worker, tokenizer: Callable, events: RunEvents, progress: ProgressPoster,
               start_step: int) -> StepEvaluator | None:
    """The run's evaluation curve (None without `eval_every_steps`); rank 0 keeps a resumed run's
    earlier points and writes the curve file into the run's folder (local storage only)."""
    cfg = worker.cfg
    if not cfg.eval_every_steps:
        return None
    local = worker.rank == 0 and "://" not in cfg.storage_path
    evaluator = StepEvaluator(cfg.data.val_shards, cfg.eval_every_steps, worker.rank, worker.world, worker.device,
                              tokenizer, str(Path(cfg.storage_path) / cfg.run_name) if local else None,
                              events, progress)
    evaluator.resume(start_step)
    return evaluator


def _stop_for_teacher(lost: TeacherUnavailableError | None, metrics: dict, module: DistillModule, optimizer,
                      cfg: TrainConfig, position: Position, init: dict | None = None,
                      command: str | None = None) -> None:
    """Checkpoint at `position` (the first step not trained) and report why the run stops; the
    driver raises it (`run_training`), and rerunning the same run name resumes at that step."""
    if lost is None:
        apps = [m.app_name for m in cfg.teacher.members() if m.mode.can_lose_teacher]
        lost = TeacherUnavailableError(f"teacher app {' or '.join(map(repr, apps))} stopped answering another rank.")
    metrics["stopped"] = (
        f"{lost} The run saved a checkpoint at epoch {position.epoch + 1} step {position.epoch_step} "
        f"(global step {position.step}) and stopped; start the teacher and rerun with run name "
        f"{cfg.run_name!r} to resume there.")
    _report(metrics, module, optimizer, cfg, position, init, command)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_trainer(cfg: TrainConfig, verbose: bool = True):
    """A TorchTrainer for `cfg`; the same run name + storage path resumes (Train V2 semantics).

    Not `verbose`: Ray Train's own INFO lines (one per report and rank) and the workers' INFO logs
    stay in Ray's log files (`ray-train-*.log` under the session's logs/train); warnings show."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg.validate().with_absolute_paths()
    storage = cfg.storage_path
    if "://" not in storage:  # a local or mounted path (cloud URIs are the bucket's ACLs' business)
        make_private_dir(storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), VERBOSE_KEY: verbose, COMMAND_KEY: driver_command()},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg),
                                     label_selector=dict(cfg.worker_label_selector) or None),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )


def worker_resources(cfg: TrainConfig) -> dict:
    """Each Ray Train worker's reservation: CPUs, `gpus_per_worker` GPUs when use_gpu (a fraction
    shares a card), and the custom resources that keep workers on student nodes (GPUs alone
    cannot: teacher nodes have them too)."""
    resources = {"CPU": cfg.cpus_per_worker, **cfg.worker_resources}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return resources


def run_training(cfg: TrainConfig, verbose: bool = False):
    """Train (or resume) and return the Ray Train `Result` (metrics from the last epoch).

    The configuration is checked on the driver first (`preflight.check_run`): a mistake fails
    once, here, instead of in every worker and again after every restart. While it trains, one
    progress line (stderr), then a summary line; `verbose` also lets the workers' INFO logs through."""
    from student_trainer.preflight import check_run

    check_run(cfg)
    start = time.perf_counter()
    with watch_run(cfg.run_name, verbose=verbose) as line:
        result = build_trainer(cfg, verbose).fit()
        if not result.error:
            line.summary = format_summary(cfg.run_name, dict(result.metrics or {}), time.perf_counter() - start,
                                          tensorboard_dir(cfg.with_absolute_paths().storage_path, cfg.run_name))
    if result.error:
        raise result.error
    if result.metrics and result.metrics.get("stopped"):
        raise TeacherUnavailableError(result.metrics["stopped"])
    return result
