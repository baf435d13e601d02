"""The evaluation curve (issue 29 item 4): the student evaluated on the test split every N optimizer
steps while it trains, each point with the run's clocks (steps, samples, training time without
evaluations, teacher-seconds), and the time-to-quality reading of such curves over seeds.

The training runs go through `train_loop_per_worker` in this process (the harness of
test_loop_overlap); two real DDP workers evaluate in test_train_integration's remote run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from student_trainer.curves import final_value, first_reaching, time_to_quality
from student_trainer.intervals import interval
from test_loop_overlap import run_loop, shards  # noqa: F401 - `shards` is the module's fixture

EVERY, STEPS, ACCUM, BATCH = 2, 5, 2, 8


def curve(*values, **clocks) -> list[dict]:
    """Points at steps 10, 20, ...: `values` as zero-shot top-1, each clock 10x the step unless given."""
    return [{"step": 10 * (i + 1), "samples_seen": 100 * (i + 1), "train_wall_s": 1.5 * (i + 1),
             "teacher_s": 0.25 * (i + 1), "zero_shot_top1": v, **clocks} for i, v in enumerate(values)]


# --------------------------------------------------------------------------- the reading
def test_first_reaching_at_the_first_point_between_points_exactly_equal_and_never():
    points = curve(0.5, 0.6, 0.7, 0.65)
    assert first_reaching(points, 0.4)["step"] == 10  # the first point already gets there
    assert first_reaching(points, 0.55)["step"] == 20  # between points: the first one above
    assert first_reaching(points, 0.7)["step"] == 30  # equal counts as reaching
    assert first_reaching(points, 0.71) is None  # never
    assert first_reaching([], 0.1) is None
    assert first_reaching(list(reversed(points)), 0.55)["step"] == 20  # read in step order
    reached = first_reaching(points, 0.6)
    assert (reached["samples_seen"], reached["train_wall_s"], reached["teacher_s"]) == (200, 3.0, 0.5)


def test_a_nan_or_missing_figure_never_reaches_and_a_nan_threshold_is_refused():
    points = curve(math.nan, 0.8)
    points.insert(0, {"step": 5})
    assert first_reaching(points, 0.1)["step"] == 20
    assert final_value(points) == 0.8 and final_value(curve(math.nan)) is None
    with pytest.raises(ValueError, match="finite"):
        first_reaching(points, math.nan)


def test_time_to_quality_over_seeds_counts_the_nevers_and_has_no_nan():
    seeds = [curve(0.5, 0.7), curve(0.7, 0.8), curve(0.5, 0.6, 0.75), curve(0.5, 0.6)]  # the last never gets there
    reading = time_to_quality(seeds, 0.7)
    assert (reading["runs"], reading["reached"]) == (4, 3)
    assert [p and p["step"] for p in reading["per_run"]] == [20, 10, 30, None]
    mean, lo, hi = interval([20.0, 10.0, 30.0])
    assert (reading["step"], reading["step_lo"], reading["step_hi"]) == pytest.approx((mean, lo, hi))
    assert reading["step"] == 20.0 and lo < 20.0 < hi
    assert reading["teacher_s"] == pytest.approx(0.5)
    numbers = [v for k, v in reading.items() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    one = time_to_quality([curve(0.9), curve(0.1)], 0.8)  # one seed: its value, no width
    assert (one["reached"], one["step"], one["step_lo"], one["step_hi"]) == (1, 10.0, 10.0, 10.0)
    none = time_to_quality([curve(0.1), curve(0.2)], 0.8)
    assert none["reached"] == 0 and none["step"] is None and none["teacher_s_hi"] is None


def test_the_benchmarks_use_the_one_interval():
    from benchmarks import methods

    assert methods.interval is interval


# --------------------------------------------------------------------------- during training
@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards):  # noqa: F811 - the imported fixture
    """The same short run (one epoch of 5 optimizer steps of 2 micro-batches) with an evaluation
    every 2 steps, and without."""
    out = {}
    for name, every in (("eval", EVERY), ("plain", 0)):
        with pytest.MonkeyPatch.context() as monkeypatch:
            captured: dict = {}
            tmp = tmp_path_factory.mktemp(name)
            log = run_loop(monkeypatch, shards, tmp, captured=captured, eval_every_steps=every, epochs=1,
                           max_steps_per_epoch=STEPS, accum_steps=ACCUM)
            out[name] = {"log": log, "dir": tmp / "runs" / "overlap", **captured}
    return out


@pytest.mark.slow  # `runs`: trains twice through the loop, in this process
def test_points_every_n_steps_and_after_the_last_with_the_runs_clocks(runs):
    points = runs["eval"]["metrics"]["eval_curve"]
    assert [p["step"] for p in points] == [2, 4, 5]  # every 2 optimizer steps, and the last
    assert [p["epoch"] for p in points] == [1, 1, 1]
    assert [p["samples_seen"] for p in points] == [s * ACCUM * BATCH for s in (2, 4, 5)]
    # the recording teacher charges 0.25 teacher-seconds a batch, as it hands the batch out
    assert [p["teacher_s"] for p in points] == pytest.approx([0.25 * ACCUM * s for s in (2, 4, 5)])
    walls = [p["train_wall_s"] for p in points]
    assert all(a < b for a, b in zip(walls, walls[1:])) and walls[0] > 0
    assert all(p["eval_s"] > 0 for p in points)
    for p in points:
        assert 0.0 <= p["zero_shot_top1"] <= p["zero_shot_top5"] <= 1.0 and 0.0 <= p["i2t_r1"] <= 1.0


@pytest.mark.slow  # `runs`: trains twice through the loop, in this process
def test_the_curve_is_written_and_reported_with_the_final_metrics(runs):
    run = runs["eval"]
    metrics, points = run["metrics"], run["metrics"]["eval_curve"]
    assert json.loads((run["dir"] / "eval_curve.json").read_text())["points"] == points
    assert metrics["zero_shot_top1"] == points[-1]["zero_shot_top1"] and metrics["step"] == STEPS
    assert metrics["eval_s"] >= sum(p["eval_s"] for p in points)  # and the curve's writing, off the clock too
    assert metrics["train_wall_s"] >= points[-1]["train_wall_s"]
    assert metrics["samples_seen"] == STEPS * ACCUM * BATCH
    assert "eval_curve" not in runs["plain"]["metrics"] and "zero_shot_top1" not in runs["plain"]["metrics"]


@pytest.mark.slow  # `runs`: trains twice through the loop, in this process
def test_the_curve_is_in_tensorboard_by_step_and_by_samples(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["eval"]["dir"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    points = runs["eval"]["metrics"]["eval_curve"]
    by_step = [(e.step, e.value) for e in acc.Scalars("eval/zero_shot_top1")]
    assert by_step == [(p["step"], pytest.approx(p["zero_shot_top1"])) for p in points]
    assert [e.step for e in acc.Scalars("eval_by_samples/zero_shot_top1")] == [p["samples_seen"] for p in points]
    assert [e.step for e in acc.Scalars("eval/teacher_s")] == [2, 4, 5]


@pytest.mark.slow  # `runs`: trains twice through the loop, in this process
def test_evaluating_does_not_change_training(runs):
    """Same seed and data: the final weights are identical with and without the evaluations."""
    with_eval, plain = runs["eval"]["weights"], runs["plain"]["weights"]
    assert with_eval.keys() == plain.keys()
    for key in plain:
        assert torch.equal(with_eval[key], plain[key]), key
    assert runs["eval"]["log"] == runs["plain"]["log"]  # the same streams opened, the same reports


@pytest.mark.slow  # `runs`: trains twice through the loop, in this process
def test_the_last_point_is_what_kd_eval_says_of_the_final_weights(runs, shards, tmp_path):  # noqa: F811
    from student_trainer.checkpoint import save_student
    from student_trainer.config import ModelConfig
    from student_trainer.evaluate import evaluate_checkpoint
    from student_trainer.factory import create_student

    model = create_student(ModelConfig(name="digits-student"), torch.device("cpu"))
    model.load_state_dict(runs["eval"]["weights"])
    save_student(model, ModelConfig(name="digits-student"), str(tmp_path))
    metrics = evaluate_checkpoint(tmp_path, str(shards / "val"))
    last = runs["eval"]["metrics"]["eval_curve"][-1]
    for key in ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1"):
        assert last[key] == pytest.approx(metrics[key], abs=1.01 / metrics["samples"]), key


def test_eval_every_steps_is_checked_before_anything_runs():
    from student_trainer.config import DataConfig, TrainConfig

    with pytest.raises(ValueError, match="eval_every_steps must be >= 0"):
        TrainConfig(data=DataConfig(train_shards="x"), eval_every_steps=-1).validate()
    with pytest.raises(ValueError, match="data.val_shards, which is empty"):
        TrainConfig(data=DataConfig(train_shards="x"), eval_every_steps=5).validate()


def test_a_test_split_without_zero_shot_templates_is_refused_on_the_driver(shards, tmp_path):  # noqa: F811
    import shutil

    from student_trainer.config import DataConfig, TrainConfig
    from student_trainer.preflight import check_run

    for tar in shards.glob("val-*.tar"):
        shutil.copy(tar, tmp_path)
    info = json.loads((shards / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**info, "templates": []}))
    cfg = TrainConfig(data=DataConfig(train_shards=str(shards / "train"), val_shards=str(tmp_path / "val"),
                                      batch_size=8),
                      num_workers=1, eval_every_steps=2)
    with pytest.raises(ValueError, match="has no class_names or templates"):
        check_run(cfg)
    cfg.data.val_shards = str(shards / "val")
    check_run(cfg)


def test_kd_train_eval_every_sets_the_field(shards):  # noqa: F811
    from cluster.cli.main import build_parser
    from cluster.cli.train import train_config_from_args

    args = build_parser().parse_args(["train", "--train-shards", str(shards / "train"), "--val-shards",
                                      str(shards / "val"), "--eval-every", "50"])
    assert train_config_from_args(args).eval_every_steps == 50


def test_one_console_line_per_evaluation():
    import io

    from student_trainer.progress import ProgressLine, format_eval

    point = {"step": 40, "samples_seen": 1280, "train_wall_s": 83.0, "teacher_s": 4.12, "eval_s": 2.3,
             "zero_shot_top1": 0.812, "zero_shot_top5": 0.99, "i2t_r1": 0.25}
    assert format_eval(point) == ("eval at step 40 (1,280 samples): zero-shot top-1 0.8120, top-5 0.9900, "
                                  "i2t R@1 0.2500 | 1:23 training, 4.1 teacher-s, eval 2.3s")
    stream = io.StringIO()
    ProgressLine("r", stream=stream, live=False).eval_line(point)
    assert stream.getvalue() == f"[r] {format_eval(point)}\n"


# --------------------------------------------------------------------------- DDP: a slice per rank
def test_each_ranks_slice_goes_back_in_test_set_order(monkeypatch):
    """Rank r embeds rows r, r+W, ...; the gather (here gloo's all_gather as seen from rank 0 of 2:
    every rank's padded slice, in rank order) puts every row back where it was. The real
    collective runs in test_train_integration's two-worker run."""
    import torch.distributed

    import student_trainer.step_eval as step_eval

    full = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    slices = [full[step_eval.rank_rows(7, rank, 2)] for rank in range(2)]
    sent = []

    def all_gather(parts, tensor):
        sent.append(tensor.clone())
        for rank, part in enumerate(parts):
            part.zero_()
            part[: len(slices[rank])] = slices[rank]

    monkeypatch.setattr(step_eval, "is_distributed", lambda: True)
    monkeypatch.setattr(step_eval, "rank_and_world_size", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    assert torch.equal(step_eval.gather_rows(slices[0], 7), full)
    assert [len(s) for s in slices] == [4, 3] and torch.equal(sent[0], slices[0])  # the longest slice: no pad


def test_counters_summed_over_ranks_keep_floats_and_ints(monkeypatch):
    import student_trainer.distributed as distributed

    def all_reduce(values, op=None):  # two ranks with the same counters
        values.mul_(2)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    summed = distributed.sum_over_ranks({"teacher_s": 0.375, "requests": 3}, torch.device("cpu"))
    assert summed == {"teacher_s": 0.75, "requests": 6} and isinstance(summed["requests"], int)


# --------------------------------------------------------------------------- teacher-seconds of a cache
def test_cached_rows_cost_their_precompute_share_once_per_worker(tmp_path):
    from student_trainer.config import TeacherSourceConfig
    from student_trainer.data.batches import Batch
    from student_trainer.teacher.sources import CachedTeacher
    from teacher_service.cache.store import make_meta, rows_table, write_table_atomic
    from teacher_service.contract.augment import image_digests, token_digests, view_recipe

    info = {"fingerprint": "fp-cost", "embed_dim": 4, "model": "ViT-B-32", "context_length": 8,
            "logit_scale": 10.0, "logit_bias": None}
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(4)]
    batch = Batch(keys=keys, images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
                  tokens=np.tile(np.arange(1, 9, dtype=np.int64), (4, 1)), labels=np.zeros(4, np.int64),
                  captions=["c"] * 4)
    emb = rng.standard_normal((4, 4)).astype(np.float16)
    recipe = view_recipe(8, 0)
    for name, writer in (("shard-a.parquet", {"teacher_s": 2.0}), ("append-b.parquet", None)):
        rows = slice(0, 2) if writer else slice(2, 4)  # k0, k1 precomputed (cost recorded); k2, k3 appended
        meta = make_meta(info, recipe, kind="shard", views=1, writer=writer)
        write_table_atomic(rows_table(meta, keys[rows], 0, emb[rows], emb[rows], image_digests(batch.images[rows]),
                                      token_digests(batch.tokens[rows], 8)), str(tmp_path / name))
    source = CachedTeacher(TeacherSourceConfig(mode="cache", cache_path=str(tmp_path)), run="unit")
    list(source.stream([batch, batch], view=0))  # the same rows twice (a later epoch on the same view)
    assert source.stats.compute_s == pytest.approx(2 * (2.0 / 2))  # k0, k1: 1.0 s a row, charged once
    assert source.stats.cache.hits == 8 and source.stats.cache.hits_uncosted == 2  # k2, k3: no record
    assert source.stats.as_metrics()["teacher_compute_s"] == pytest.approx(2.0)
