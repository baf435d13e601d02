"""TensorBoard event files of a run, under `<storage_path>/<run_name>/tensorboard/`.

Rank 0 alone writes (the ranks train one model; eight copies of its curves would only disagree
in noise). A resumed run appends a new event file to the same directory, its steps continuing
the global step, so TensorBoard draws one curve across restarts. A tag is `<when>/<key>`: when it
is written, and the quantity's key in the run's metrics (`metrics.json`, Ray Train's results), so a
reader that drops the prefix (`kd report`) finds the same names everywhere:

- `train/` every optimizer step: `loss` (the total), `<name>_loss` per loss term, `lr`,
  `logit_scale`, `samples_per_s`, `teacher_wait_s` (rank 0's);
- `epoch/` at every report (epoch ends, checkpoints): the `teacher_*` counters (requests, samples,
  retries, wait, cache hits ...), the `data_*` counters (skipped samples by reason, in total),
  `train_samples_per_s`, `run_samples_per_s`, `epoch_time_s`, `samples_seen` and `samples_trained`
  (they differ with data selection), the `selection_*` figures (teacher and student seconds, bytes
  and scores of data selection: student_trainer.selection), and the step profile `step_<part>_ms`
  (data, teacher_wait, select, convert, compute, other: student_trainer.profile);
- `eval/` per evaluation (`log_eval`, and the evaluation curve's points, `eval_point`): zero-shot
  top-1/5, retrieval R@1/5/10 both ways; the curve's points add `eval_s` (that evaluation's
  seconds), `train_wall_s` and `teacher_s` (the run's so far), by step;
- `eval_by_samples/` the curve's figures again with the samples seen (all ranks) as the x axis
  (`kd report` reads these by step only from `eval/`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from student_trainer.progress import StepSnapshot

TENSORBOARD_DIR = "tensorboard"
EVAL_METRICS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
_EPOCH_METRICS = ("train_samples_per_s", "run_samples_per_s", "epoch_time_s", "samples_seen", "samples_trained")
_EPOCH_PREFIXES = ("teacher_", "data_", "step_", "selection_")
BY_SAMPLES = "eval_by_samples"  # tag prefix of the curve drawn against samples seen, not steps
_POINT_CLOCKS = ("eval_s", "train_wall_s", "teacher_s")

log = logging.getLogger(__name__)


def tensorboard_dir(storage_path: str, run_name: str) -> str:
    """Where a run's event files go (a local or mounted storage path; a URI is joined with '/')."""
    if "://" in storage_path:
        return f"{storage_path.rstrip('/')}/{run_name}/{TENSORBOARD_DIR}"
    return str(Path(storage_path) / run_name / TENSORBOARD_DIR)


def _writer(log_dir: str):
    """A SummaryWriter, or None with one warning where it cannot write (e.g. a URI scheme
    tensorboard cannot open): curves are worth a warning, never a failed run."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=log_dir, flush_secs=30)
    except Exception as exc:  # noqa: BLE001
        log.warning("no TensorBoard event files for this run (%s: %s)", log_dir, exc)
        return None


class RunEvents:
    """Rank 0's event file; on other ranks (or without a writer) every call does nothing."""

    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self._w = _writer(log_dir) if log_dir else None

    @classmethod
    def for_rank(cls, storage_path: str, run_name: str, rank: int) -> RunEvents:
        return cls(tensorboard_dir(storage_path, run_name) if rank == 0 else None)

    def step(self, s: StepSnapshot) -> None:
        """The per-step curves."""
        if self._w is None:
            return
        scalars = {**s.losses, "lr": s.lr, "logit_scale": s.logit_scale, "samples_per_s": s.samples_per_s,
                   "teacher_wait_s": s.teacher_wait_s}
        for key, value in scalars.items():
            self._w.add_scalar(f"train/{key}", value, s.step)

    def report(self, step: int, metrics: Mapping) -> None:
        """What Ray Train is told at a report: teacher and skip counters, epoch throughput."""
        if self._w is None:
            return
        for key, value in metrics.items():
            if _at_reports(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._w.add_scalar(f"epoch/{key}", value, step)
        self._w.flush()

    def eval_point(self, point: Mapping) -> None:
        """One point of the evaluation curve (`step_eval`): `eval/<metric>` at its step, and
        `eval_by_samples/<metric>` at its samples seen."""
        if self._w is None:
            return
        for key in (*EVAL_METRICS, *_POINT_CLOCKS):
            if isinstance(point.get(key), (int, float)):
                self._w.add_scalar(f"eval/{key}", point[key], int(point["step"]))
        for key in EVAL_METRICS:
            if isinstance(point.get(key), (int, float)):
                self._w.add_scalar(f"{BY_SAMPLES}/{key}", point[key], int(point["samples_seen"]))
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def _at_reports(key: str) -> bool:
    """Counters and throughput, drawn where the run reports; the loss means of a report are left
    out (the `train/` curves hold every step's losses)."""
    return key in _EPOCH_METRICS or key.startswith(_EPOCH_PREFIXES)


def log_eval(log_dir: str, step: int, metrics: Mapping) -> None:
    """Add one evaluation's zero-shot and retrieval metrics (`eval/<metric>`) at `step`."""
    writer = _writer(log_dir)
    if writer is None:
        return
    for name in EVAL_METRICS:
        if isinstance(metrics.get(name), (int, float)):
            writer.add_scalar(f"eval/{name}", metrics[name], step)
    writer.close()


def log_checkpoint_eval(checkpoint_dir: str | Path, metrics: Mapping) -> str | None:
    """Join an evaluation of a run's checkpoint (`<run>/checkpoint_*`, as Ray Train stores them) to
    the run's event files, at the step the checkpoint holds (its `metrics.json`). Returns the
    event directory, or None for a checkpoint outside a run with event files (a copied one)."""
    checkpoint = Path(checkpoint_dir)
    events_dir, reported = checkpoint.parent / TENSORBOARD_DIR, checkpoint / "metrics.json"
    if not events_dir.is_dir() or not reported.is_file():
        return None
    step = json.loads(reported.read_text()).get("step")
    if step is None:
        return None
    log_eval(str(events_dir), int(step), metrics)
    return str(events_dir)
