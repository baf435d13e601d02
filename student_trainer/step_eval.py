"""The evaluation curve: the student evaluated on the test split (`data.val_shards`) every
`eval_every_steps` optimizer steps and after the last one, while it trains.

Under DDP every rank embeds its own slice of the test images (rank r takes images r, r+W, ...),
the image features are gathered (one all_gather, padded to one length) and every rank computes
the figures on the whole set with `evaluate.evaluate_inputs`, the code `kd eval` runs: one
evaluation costs each rank 1/W of the images and gives one process's figures (up to the rounding
of batched forwards). (Rank 0
alone would leave the other ranks idle at the next all-reduce for the whole evaluation.) The
class prompts and unique captions are few; every rank embeds them. The ranks evaluate at the same
global optimizer step (`step % eval_every_steps`), which counts whole optimizer steps whatever
`accum_steps` is, so the collectives line up.

An evaluation leaves training as it was: no gradients, the model's mode restored, the RNG states
(torch, CUDA, numpy, random) restored, and nothing read from the training stream; its time is
kept off the training clock (`train_wall_s`) and the step profile. The test split is read and
decoded once per worker, at the first evaluation, and its prompts tokenised once.

Each point records where the run stood (`CURVE_CLOCKS`) and the figures (`events.EVAL_METRICS`);
rank 0 logs it to TensorBoard (`eval/<metric>` by step, `eval_by_samples/<metric>` by samples
seen), rewrites `<storage_path>/<run_name>/eval_curve.json` (atomically) and shows one line on
the driver's console. `student_trainer.curves` reads the curves.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from student_trainer.curves import CURVE_FILE, read_curve
from student_trainer.distributed import is_distributed, rank_and_world_size
from student_trainer.evaluate import EvalInputs, evaluate_inputs
from student_trainer.events import EVAL_METRICS, RunEvents
from student_trainer.progress import ProgressPoster

log = logging.getLogger(__name__)
EVAL_BATCH = 256  # images per forward while evaluating


@contextlib.contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """Every RNG the loop may draw from (torch on CPU and `device`, numpy's and Python's global
    ones) is where it was when the block began: an evaluation cannot change what training draws."""
    devices = [device] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def gather_rows(features: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows back in test-set order: rank r holds rows r, r+W, ... (`rank_rows`)."""
    if not is_distributed():
        return features
    _, world = rank_and_world_size()
    longest = -(-total // world)
    padded = torch.zeros((longest, features.shape[1]), dtype=features.dtype, device=features.device)
    padded[: len(features)] = features
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty((total, features.shape[1]), dtype=features.dtype, device=features.device)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, total, world))]
    return out


def rank_rows(total: int, rank: int, world: int) -> np.ndarray:
    """The test images rank `rank` of `world` embeds: every world-th from its rank."""
    return np.arange(rank, total, world)


@dataclass
class StepEvaluator:
    """One worker's evaluation curve: the test split (loaded at the first evaluation), the points
    so far (a resumed run's earlier ones included), and where rank 0 reports them."""

    val_shards: str
    every: int
    rank: int
    world: int
    device: torch.device
    tokenizer: Callable
    run_dir: str | None  # rank 0 writes eval_curve.json here (None: not written)
    events: RunEvents
    progress: ProgressPoster
    points: list[dict] = field(default_factory=list)
    _inputs: EvalInputs | None = None

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (global, 1-based after the step) is an evaluation step."""
        return bool(self.every) and step % self.every == 0

    def done_at(self, step: int) -> bool:
        return bool(self.points) and self.points[-1]["step"] == step

    def evaluate(self, model: torch.nn.Module, clocks: dict) -> dict:
        """Evaluate `model` (the unwrapped student) now; the point (`clocks` and the figures) is
        recorded and reported. A collective under DDP: every rank calls it at the same step."""
        started = time.perf_counter()
        with rng_kept(self.device), torch.no_grad():
            inputs = self._load(model)
            rows = rank_rows(len(inputs.images), self.rank, self.world)
            metrics = evaluate_inputs(model, inputs, batch_size=EVAL_BATCH, device=str(self.device), rows=rows,
                                      gather=lambda f: gather_rows(f, len(inputs.images)))
        point = {**clocks, "eval_s": round(time.perf_counter() - started, 4),
                 **{k: metrics[k] for k in EVAL_METRICS if k in metrics}}
        self.points.append(point)
        if self.rank == 0:
            self._report(point)
        return point

    def _load(self, model: torch.nn.Module) -> EvalInputs:
        """The test split, read and decoded at the first evaluation only (at the student's input size)."""
        if self._inputs is None:
            from student_trainer.data.batches import eval_set
            from teacher_service.contract.preprocess import preprocess_spec
            from teacher_service.shards import load_dataset_info, resolve_shards

            shards = resolve_shards(self.val_shards)
            info = load_dataset_info(shards)
            data = eval_set(shards, image_size=max(preprocess_spec(model).image_size), tokenizer=self.tokenizer)
            self._inputs = EvalInputs.prepare(data, class_names=info["class_names"], templates=info["templates"],
                                              tokenizer=self.tokenizer)
        return self._inputs

    def _report(self, point: dict) -> None:
        self.events.eval_point(point)
        self.progress.post_eval(point)
        if self.run_dir is not None:
            from teacher_service.atomic_files import write_atomic

            write_atomic(Path(self.run_dir) / CURVE_FILE, json.dumps({"points": self.points}, indent=1))
        log.info("eval at step %d: zero-shot top-1 %.4f (%.1f s)", point["step"],
                 point.get("zero_shot_top1", float("nan")), point["eval_s"])

    def resume(self, step: int) -> None:
        """A resumed run's earlier points, up to the step it resumes at (points after it were
        made by steps it trains again), read from the run's curve file (rank 0 only)."""
        if self.run_dir is None:
            return
        self.points = [p for p in read_curve(self.run_dir) if p["step"] <= step]

