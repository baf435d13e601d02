"""Teacher-scored data selection end to end on the session's Ray cluster (issue 30): a run in each
mode family (remote, hybrid, an ensemble of two pools) draws super-batches, trains on the top
fraction by its score, and a second run asking for the same super-batches is answered the pool's
remembered scores (`scores_reused` rises by every sample it asked about). For teacher_loss the kept
rows' mean score is recomputed by hand from the teachers' embeddings of the super-batches the run drew."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from selection_by_hand import hand_row_losses, hand_top
from tiny_models import running_app, shared_teacher, tiny_app_config, train_shards

from student_trainer.config import (DataConfig, ModelConfig, OptimConfig, SelectionConfig, TeacherSourceConfig,
                                   TrainConfig)

pytestmark = pytest.mark.ray

APPS = (shared_teacher().serving.app_name, "kd-select-narrow")  # wide (48): the session's app, tiny_teacher_app
BATCH, K, STEPS = 8, 2, 3
ASKED = K * BATCH * STEPS  # samples one run asks the pool to score (one worker)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory, name="digits-selection")


@pytest.fixture(scope="module")
def apps(tiny_teacher_app):
    """The wide teacher is the session's shared app (the tests count its scores by differences)."""
    with running_app(tiny_app_config(APPS[1], 32, K * BATCH)) as narrow:
        yield tiny_teacher_app, narrow


def selection_cfg(shards: str, tmp_path, run: str, score: str, seed: int = 0, **teacher) -> TrainConfig:
    return TrainConfig(
        run_name=run, storage_path=str(tmp_path / "runs"), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50, num_views=1),
        teacher=TeacherSourceConfig(**{"mode": "remote", "app_name": APPS[0], "timeout_s": 60.0, "retries": 1,
                                       **teacher}),
        selection=SelectionConfig(score=score, k=K), optim=OptimConfig(lr=1e-3, warmup_steps=1), epochs=1,
        max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1, log_every_steps=0, seed=seed)


def scores_counted(handle) -> dict:
    from teacher_service.app import collect_stats

    stats = collect_stats(handle)
    return {k: stats[k] for k in ("scores_requested", "scores_computed", "scores_reused")}


def grew(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def runs_in_turn(cfgs: list[TrainConfig], handles) -> tuple[list[dict], list[list[dict]]]:
    """Train the runs one after the other; their metrics, and each pool's score counts each run added."""
    from student_trainer.train import run_training

    metrics, added = [], []
    for cfg in cfgs:
        before = [scores_counted(h) for h in handles]
        metrics.append(run_training(cfg).metrics)
        added.append([grew(b, scores_counted(h)) for b, h in zip(before, handles)])
    return metrics, added


def hand_kept_mean(shards: str, handles, weights: list[float]) -> float:
    """Rank 0's super-batches of the run drawn again, each teacher's embeddings of them asked again,
    the rows' scores (weighted over teachers) and the top BATCH of each computed by hand."""
    from student_trainer.data.batches import train_batches
    from student_trainer.factory import create_student, create_tokenizer
    from teacher_service import EmbedRequest
    from teacher_service.shards import resolve_shards

    model = ModelConfig(name="digits-student")
    tokenizer = create_tokenizer(create_student(model), model)
    batches = train_batches(resolve_shards(shards), rank=0, world_size=1, batch_size=K * BATCH, image_size=32,
                            epoch=0, seed=0, tokenizer=tokenizer, shuffle_buffer=50)
    kept = []
    for _, batch in zip(range(STEPS), batches):
        per_teacher = []
        for handle in handles:
            answer = handle.embed.remote(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens,
                                                      run="hand-check")).result(timeout_s=120)
            per_teacher.append(hand_row_losses(answer.image_features, answer.text_features, answer.logit_scale))
        scores = [sum(w / sum(weights) * t[i] for w, t in zip(weights, per_teacher)) for i in range(len(batch))]
        kept += [scores[i] for i in hand_top(scores, BATCH)]
    return statistics.fmean(kept)


def assert_selected(metrics: dict, score: str) -> None:
    assert np.isfinite(metrics["loss"]) and metrics["step"] == STEPS
    assert (metrics["samples_seen"], metrics["samples_trained"]) == (ASKED, STEPS * BATCH)
    assert (metrics["selection_score"], metrics["selection_k"]) == (score, K)
    assert metrics["selection_teacher_s"] > 0 and metrics["selection_bytes"] > 0
    assert metrics["selection_score_kept_mean"] > metrics["selection_score_drawn_mean"]  # the top half of each


def test_remote_selection_trains_on_the_teachers_top_fraction_and_a_second_run_reuses_its_scores(
        shards, apps, tmp_path, capsys):
    from cluster.cli import main
    from student_trainer.events import tensorboard_dir

    wide = apps[0]
    cfgs = [selection_cfg(shards, tmp_path, f"select-remote-{i}", "teacher_loss") for i in (1, 2)]
    (first, second), added = runs_in_turn(cfgs, [wide])
    assert added[0][0] == {"scores_requested": ASKED, "scores_computed": ASKED, "scores_reused": 0}
    assert added[1][0] == {"scores_requested": ASKED, "scores_computed": 0, "scores_reused": ASKED}
    for metrics in (first, second):
        assert_selected(metrics, "teacher_loss")
        assert metrics["selection_student_s"] == 0
    assert first["selection_score_kept_mean"] == pytest.approx(hand_kept_mean(shards, [wide], [1.0]), rel=2e-3)
    assert second["selection_score_kept_mean"] == first["selection_score_kept_mean"]  # the same scores, reused

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir(cfgs[0].storage_path, cfgs[0].run_name))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/selection_teacher_s", "epoch/selection_bytes", "epoch/samples_seen",
            "epoch/samples_trained", "epoch/step_select_ms"} <= tags
    capsys.readouterr()
    assert main(["teacher", "status", "--app-name", APPS[0], "--json"]) == 0
    pool = json.loads(capsys.readouterr().out)["stats"]["runs"]
    assert pool["select-remote-2"]["scores_reused"] == ASKED and pool["select-remote-1"]["scores_computed"] == ASKED
    assert main(["teacher", "status", "--app-name", APPS[0]]) == 0
    assert "(data selection)" in capsys.readouterr().out


def test_hybrid_selection_by_learnability_scores_whole_misses_on_the_pool(shards, apps, tmp_path):
    """Each run on a fresh cache: every super-batch misses, goes to the pool whole and is scored there;
    the second run's scores are the first's, remembered. A third run on the first run's cache hits
    every row: it asks the pool nothing and scores the cached rows itself. The student's part is
    always the run's own. Seed 1: super-batches no other test here has had scored (the shared app
    remembers the remote test's)."""
    cfgs = [selection_cfg(shards, tmp_path, f"select-hybrid-{i}", "learnability", seed=1, mode="hybrid",
                          cache_path=str(tmp_path / f"cache-{cache}")) for i, cache in ((1, 1), (2, 2), (3, 1))]
    (first, second, cached), added = runs_in_turn(cfgs, [apps[0]])
    assert added[0][0]["scores_computed"] == ASKED
    assert added[1][0] == {"scores_requested": ASKED, "scores_computed": 0, "scores_reused": ASKED}
    assert added[2][0] == {"scores_requested": 0, "scores_computed": 0, "scores_reused": 0}
    for metrics in (first, second, cached):
        assert_selected(metrics, "learnability")
        assert metrics["selection_student_s"] > 0
    for metrics in (first, second):
        assert metrics["teacher_cache_misses"] == metrics["teacher_cache_appends"] == ASKED
    assert (cached["teacher_cache_hits"], cached["teacher_cache_misses"], cached["teacher_requests"]) == (ASKED, 0, 0)


def test_ensemble_selection_averages_both_pools_scores_by_loss_weight(shards, apps, tmp_path):
    sources = [{"name": "wide", "app_name": APPS[0]}, {"name": "narrow", "app_name": APPS[1], "loss_weight": 3.0}]
    cfgs = [selection_cfg(shards, tmp_path, f"select-ensemble-{i}", "teacher_loss", sources=sources)
            for i in (1, 2)]
    (first, second), added = runs_in_turn(cfgs, apps)
    for pool in (0, 1):  # the wide pool may remember the remote test's super-batches already: the same draw
        assert added[0][pool]["scores_requested"] == ASKED
        assert added[1][pool] == {"scores_requested": ASKED, "scores_computed": 0, "scores_reused": ASKED}
    assert added[0][1]["scores_computed"] == ASKED  # the narrow pool scored them first
    for metrics in (first, second):
        assert_selected(metrics, "teacher_loss")
        assert metrics["teacher_mode"] == "ensemble"
    assert first["selection_score_kept_mean"] == pytest.approx(hand_kept_mean(shards, apps, [1.0, 3.0]), rel=2e-3)
