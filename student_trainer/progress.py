"""What a run shows on the console: one live progress line, and no per-step logs unless asked.

Ray Train reports metrics only where a run checkpoints, and whatever a worker logs reaches the
driver's console once per rank. So rank 0 posts where it stands to a small named actor (the
board) at most twice a second, fire-and-forget; the driver polls the board and draws one line
(`ProgressLine`: a tqdm bar on a terminal, a plain line per epoch and every `every_s` seconds
otherwise). Workers of a quiet run keep their INFO logs in Ray's log files only
(`quiet_worker_console`); warnings and errors still reach the console.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

BOARD_PREFIX = "kd-progress-"
VERBOSE_KEY = "_console_verbose"  # train_loop_config key: the driver's --verbose, for the workers


@dataclass(frozen=True)
class StepSnapshot:
    """Where a run stands after one optimizer step, as rank 0 sees it: what the progress line and
    the TensorBoard event file both take, built once per step."""

    step: int
    total_steps: int
    start_step: int  # the global step this process started at (a resume starts later)
    epoch: int  # 1-based
    epochs: int
    epoch_step: int  # 1-based, within the epoch
    steps: int  # optimizer steps per epoch
    elapsed_s: float  # since this process started training
    samples_per_s: float  # all ranks, since this process started training
    teacher_wait_s: float  # rank 0's time blocked on the teacher
    lr: float = 0.0
    logit_scale: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)  # "loss" (the total) and every "*_loss"

    @property
    def loss(self) -> float:
        return self.losses.get("loss", float("nan"))


def board_name(run_name: str) -> str:
    return BOARD_PREFIX + run_name


class _Board:
    """Holds the latest snapshot of one run (as a dict) and its evaluation points: rank 0 writes,
    the driver reads."""

    def __init__(self) -> None:
        self._latest: dict | None = None
        self._evals: list[dict] = []

    def post(self, snapshot: dict) -> None:
        self._latest = snapshot

    def post_eval(self, point: dict) -> None:
        self._evals.append(point)

    def latest(self) -> dict | None:
        return self._latest

    def evals_after(self, seen: int) -> list[dict]:
        """The evaluation points after the first `seen` (the driver prints each once)."""
        return self._evals[seen:]


class ProgressPoster:
    """Rank 0's side: posts at most every `every_s` seconds (and always an epoch's last step).

    Finds the board by name once; without one (a trainer built by hand, another job) posting is a
    no-op, so progress can never fail a run."""

    def __init__(self, run_name: str | None, every_s: float = 0.5) -> None:
        self._board = _find_board(run_name) if run_name else None
        self._every_s = every_s
        self._last = 0.0

    @classmethod
    def for_rank(cls, run_name: str, rank: int) -> ProgressPoster:
        return cls(run_name if rank == 0 else None)

    def post(self, snapshot: StepSnapshot) -> None:
        if self._board is None:
            return
        now = time.monotonic()
        if now - self._last < self._every_s and snapshot.epoch_step < snapshot.steps:
            return
        self._last = now
        self._send("post", asdict(snapshot))

    def post_eval(self, point: dict) -> None:
        """One point of the evaluation curve, for its console line (every one is shown)."""
        if self._board is not None:
            self._send("post_eval", dict(point))

    def _send(self, method: str, payload: dict) -> None:
        try:
            getattr(self._board, method).remote(payload)
        except Exception:  # noqa: BLE001 - the board is a convenience, never a failure
            self._board = None


def _find_board(run_name: str):
    import ray

    try:
        return ray.get_actor(board_name(run_name))
    except (ValueError, RuntimeError):
        return None


# --------------------------------------------------------------------------- drawing, on the driver
def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def eta_s(s: StepSnapshot) -> float | None:
    """Seconds left at this process's pace so far (None before its first step)."""
    done = s.step - s.start_step
    return s.elapsed_s * (s.total_steps - s.step) / done if done > 0 else None


def format_progress(s: StepSnapshot) -> str:
    """`epoch 1/2 step 3/45 | 312.4 samples/s | loss 2.3456 | teacher wait 1.2s (4%) | ETA 1:23`."""
    wait_share = 100.0 * s.teacher_wait_s / s.elapsed_s if s.elapsed_s > 0 else 0.0
    eta = eta_s(s)
    return (f"epoch {s.epoch}/{s.epochs} step {s.epoch_step}/{s.steps} | {s.samples_per_s:.1f} samples/s | "
            f"loss {s.loss:.4f} | teacher wait {s.teacher_wait_s:.1f}s ({wait_share:.0f}%) | "
            f"ETA {_duration(eta) if eta is not None else '?'}")


def format_eval(point: dict) -> str:
    """`eval at step 40 (1.3k samples): zero-shot top-1 0.8120, top-5 0.9900 | 1:23 training, 4.1 teacher-s, eval 2.3s`."""
    figures = ", ".join(f"{name} {point[key]:.4f}" for key, name in
                        (("zero_shot_top1", "zero-shot top-1"), ("zero_shot_top5", "top-5"), ("i2t_r1", "i2t R@1"))
                        if isinstance(point.get(key), (int, float)))
    return (f"eval at step {point.get('step')} ({point.get('samples_seen', 0):,} samples): {figures} | "
            f"{_duration(point.get('train_wall_s', 0.0))} training, {point.get('teacher_s', 0.0):.1f} "
            f"teacher-s, eval {point.get('eval_s', 0.0):.1f}s")


def format_summary(run_name: str, metrics: dict, wall_s: float, tensorboard: str | None = None) -> str:
    """The line a finished run ends with: where it got, how fast, what it skipped, where its curves are."""
    parts = [f"[{run_name}] done in {_duration(wall_s)}", f"epoch {metrics.get('epoch', '?')}",
             f"step {metrics.get('step', '?')}"]
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):.4f}")
    parts.append(f"{float(metrics.get('run_samples_per_s', 0.0)):.1f} samples/s")
    if isinstance(metrics.get("zero_shot_top1"), (int, float)):
        parts.append(f"zero-shot top-1 {float(metrics['zero_shot_top1']):.4f}")
    if metrics.get("teacher_requests"):
        parts.append(f"teacher wait {float(metrics.get('teacher_wait_s', 0.0)):.1f}s, "
                     f"{metrics.get('teacher_retries', 0)} retries")
    if metrics.get("data_skipped_total"):
        parts.append(f"{metrics['data_skipped_total']} samples skipped")
    line = ", ".join(parts)
    return line + (f"; TensorBoard: tensorboard --logdir {tensorboard}" if tensorboard else "")


class ProgressLine:
    """One line per run: a tqdm bar redrawn in place on a terminal; else (a log, a pipe, --verbose
    where Ray's own lines interleave) a plain line at every new epoch and every `every_s` seconds."""

    def __init__(self, run_name: str, stream: TextIO | None = None, every_s: float = 30.0,
                 live: bool | None = None) -> None:
        self.run_name = run_name
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.live = self.stream.isatty() if live is None else live
        self._bar: Any = None
        self._last_line = (0, -1.0)  # (epoch, monotonic time) of the last plain line
        self._latest: StepSnapshot | None = None
        self.evals_shown = 0  # evaluation points printed so far (`eval_line`)
        self.summary: str | None = None  # printed by close(); `watch_run` closes the line

    def update(self, s: StepSnapshot) -> None:
        if s == self._latest:
            return
        self._latest = s
        if self.live:
            self._draw_bar(s)
            return
        epoch, at = self._last_line
        if s.epoch != epoch or time.monotonic() - at >= self.every_s:
            self._last_line = (s.epoch, time.monotonic())
            print(f"[{self.run_name}] {format_progress(s)}", file=self.stream, flush=True)

    def _draw_bar(self, s: StepSnapshot) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=s.total_steps, initial=s.start_step, file=self.stream, dynamic_ncols=True,
                             bar_format="{desc} {bar:20}")  # the text carries its own rate and ETA
        self._bar.n = s.step
        self._bar.set_description_str(f"[{self.run_name}] {format_progress(s)}", refresh=True)

    def eval_line(self, point: dict) -> None:
        """One line per evaluation, above the bar on a terminal."""
        line = f"[{self.run_name}] {format_eval(point)}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.summary:
            print(self.summary, file=self.stream, flush=True)


@contextlib.contextmanager
def watch_run(run_name: str, *, verbose: bool = False, poll_s: float = 1.0,
              stream: TextIO | None = None) -> Iterator[ProgressLine]:
    """Create the run's board, draw its progress until the block ends, then remove the board.

    The caller may set the yielded line's `summary`, printed last. The board is a zero-CPU actor in this
    job's namespace; Ray Train's workers belong to the same job, so rank 0 finds it by name."""
    import ray

    board = ray.remote(num_cpus=0)(_Board).options(name=board_name(run_name), get_if_exists=True).remote()
    line = ProgressLine(run_name, stream=stream, live=False if verbose else None)
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(board, line, stop, poll_s), daemon=True,
                              name=f"progress-{run_name}")
    poller.start()
    try:
        yield line
    finally:
        stop.set()
        poller.join(timeout=poll_s + 10)
        _poll_once(board, line)  # the last steps, if they came after the last poll
        line.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


def _poll(board, line: ProgressLine, stop: threading.Event, poll_s: float) -> None:
    while not stop.wait(poll_s):
        _poll_once(board, line)


def _poll_once(board, line: ProgressLine) -> None:
    import ray

    try:
        latest, evals = ray.get([board.latest.remote(), board.evals_after.remote(line.evals_shown)], timeout=10)
    except Exception:  # noqa: BLE001 - a slow or gone board only delays the line
        return
    if latest:
        line.update(StepSnapshot(**latest))
    for point in evals:
        line.eval_line(point)
    line.evals_shown += len(evals)


# --------------------------------------------------------------------------- the workers' console
class _WarningsOnly(logging.Filter):
    """Warnings and errors, except open_clip's "No pretrained weights loaded" that every student
    created on purpose from random weights raises, once per rank (it stays in the log files)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not str(record.msg).startswith("No pretrained weights loaded")


def quiet_worker_console() -> None:
    """Keep INFO records of this worker (open_clip's model messages, Ray Train's per-report lines,
    the per-step lines, the Serve client's) off the console; Ray Train's worker log files keep them.

    Ray Train configures the root and `ray.train` loggers of a worker with one console handler
    and file handlers, Serve its `ray.serve` logger with a console handler; only those get the filter."""
    quiet_console("", "ray.train", "ray.serve")


# Ray Train's detached placement-group cleaner asks the state API every few seconds whether the
# controller lives; without a dashboard (the embedded cluster starts none) each ask fails with a warning.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of the embedded cluster (`cluster.local`): the cleaner's "Failed to query
    Ray Train Controller actor state" warning, printed every check interval of every run because
    that cluster has no state API, stays off the console and the logs. What the cleaner guards
    against (a controller dying without removing its placement group) cannot outlive the embedded
    cluster, which ends with the command; its errors still show.

    Each worker also learns its own cluster's address (RAY_ADDRESS, unless set): Ray code that
    looks the cluster up by itself, as the cleaner's state query does, otherwise dies with
    "Found multiple active Ray instances" (a traceback on the console) whenever another Ray
    cluster runs on the machine."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_console(*logger_names: str) -> None:
    """Warnings and errors only, on the console handlers (StreamHandlers that are not files) of
    the named loggers ("" is the root); their file handlers keep every record."""
    warnings_only = _WarningsOnly()
    for name in logger_names:
        for handler in logging.getLogger(name or None).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, _WarningsOnly) for f in handler.filters):
                handler.addFilter(warnings_only)
