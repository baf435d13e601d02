"""`kd report` and the demo/sweep pictures: what a run leaves (Ray Train V2's checkpoint snapshot,
each checkpoint's metrics.json, TensorBoard event files) is read into curves by step, drawn side by
side, and the final metrics drawn with the baseline, next to a report.json that keeps what it held."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.report import find_runs, load_run, write_report, write_sweep_report


def _metrics(step: int, loss: float, **extra) -> dict:
    return {"step": step, "epoch": step // 2, "loss": loss, "clip_loss": loss / 2, "teacher_mode": "remote",
            "teacher_model": None, **extra}


def fake_run(root: Path, name: str, steps: list[int], kept: int = 2) -> Path:
    """A run folder as Ray Train V2 leaves it: the snapshot lists the kept checkpoints' metrics,
    and each kept checkpoint_* holds the metrics.json rank 0 wrote (older ones were deleted)."""
    run = root / name
    results = []
    for i, step in enumerate(steps[-kept:]):
        ckpt = run / f"checkpoint_2026-12-02_10-00-0{i}.000000"
        ckpt.mkdir(parents=True)
        m = _metrics(step, 10.0 - step)
        (ckpt / "metrics.json").write_text(json.dumps(m))
        results.append({"version": 0, "checkpoint_dir_name": ckpt.name, "metrics": m})
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results,
                                                                      "latest_checkpoint_result": results[-1]}))
    return run


def write_events(run: Path, points: dict[int, dict[str, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tensorboard"))
    for step, values in points.items():
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG: proves it is an image, and lets a test see how many panels it holds."""
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[:2]


def test_checkpoint_reports_become_points_by_step(tmp_path):
    run = load_run(fake_run(tmp_path, "a", [2, 4, 6]))
    assert [p["step"] for p in run.points] == [4.0, 6.0]  # older checkpoints were not kept
    assert run.final()["loss"] == 4.0 and "teacher_mode" not in run.final()  # numbers only
    assert run.loss_keys() == ["loss", "clip_loss"]


def test_event_files_add_per_step_points_and_evaluation(tmp_path):
    run_dir = fake_run(tmp_path, "a", [4])
    write_events(run_dir, {1: {"train/loss": 9.0}, 2: {"train/loss": 8.0}, 4: {"eval/zero_shot_top1": 0.5}})
    run = load_run(run_dir)
    assert [p["step"] for p in run.points] == [1.0, 2.0, 4.0]
    assert run.series("loss") == ([1.0, 2.0, 4.0], [9.0, 8.0, 6.0])  # step 4: checkpoint and events merged
    assert run.final()["zero_shot_top1"] == 0.5


def test_find_runs_in_a_run_a_storage_path_and_a_demo_workdir(tmp_path):
    storage = tmp_path / "demo" / "runs"
    a, b = fake_run(storage, "a", [2]), fake_run(storage, "b", [2])
    assert find_runs([a]) == [a]
    assert find_runs([storage]) == [a, b]
    assert find_runs([tmp_path / "demo"]) == [a, b]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no runs under"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError):
        find_runs([tmp_path / "missing"])


def test_report_draws_runs_side_by_side_and_keeps_the_demo_report(tmp_path):
    demo = tmp_path / "demo"
    fake_run(demo / "runs", "distill", [2, 4]), fake_run(demo / "runs", "baseline", [2, 4])
    models = {"teacher": {"zero_shot_top1": 0.9, "zero_shot_top5": 1.0, "i2t_r1": 0.2, "t2i_r1": 0.2},
              "student_distilled": {"zero_shot_top1": 0.8, "zero_shot_top5": 0.9, "i2t_r1": 0.1, "t2i_r1": 0.1},
              "student_baseline": {"zero_shot_top1": 0.6, "zero_shot_top5": 0.9, "i2t_r1": 0.1, "t2i_r1": 0.1}}
    (demo / "report.json").write_text(json.dumps({"models": models, "baseline": "student_baseline",
                                                  "gain_over_baseline": {"zero_shot_top1": 0.2}}))
    doc = write_report([demo], demo)
    assert doc["plots"] == ["learning_curves.png", "final_metrics.png"]
    saved = json.loads((demo / "report.json").read_text())
    assert saved["gain_over_baseline"] == {"zero_shot_top1": 0.2} and saved["models"] == models
    assert saved["baseline"] == "student_baseline" and set(saved["runs"]) == {"distill", "baseline"}
    assert saved["runs"]["distill"]["final"]["loss"] == 6.0 and saved["runs"]["distill"]["reports"] == 2
    two_wide = png_size(demo / "learning_curves.png")[1]
    write_report([demo / "runs" / "distill"], tmp_path / "one")
    assert png_size(tmp_path / "one" / "learning_curves.png")[1] < two_wide  # one column per run
    assert png_size(demo / "final_metrics.png")[0] > 100


def test_without_evaluation_the_bars_show_the_final_loss(tmp_path):
    fake_run(tmp_path / "runs", "a", [2])
    doc = write_report([tmp_path / "runs"], tmp_path / "out", baseline="a")
    assert doc["plots"] == ["learning_curves.png", "final_metrics.png"] and doc["baseline"] == "a"


def test_kd_report_command(tmp_path, capsys):
    fake_run(tmp_path / "runs", "a", [2, 4])
    assert main(["report", str(tmp_path / "runs" / "a"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 run(s): a" in out and "learning_curves.png" in out
    assert (tmp_path / "out" / "final_metrics.png").is_file()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2  # one `kd: error:` line


def test_sweep_pictures_land_next_to_the_runs(tmp_path, capsys):
    from student_trainer.config import TrainConfig

    fake_run(tmp_path, "a", [2]), fake_run(tmp_path, "b", [2])
    configs = [TrainConfig(run_name=n, storage_path=str(tmp_path)) for n in ("a", "b", "never-ran")]
    out = write_sweep_report(configs)
    assert out is not None and out.parent == tmp_path.resolve()
    assert set(json.loads((out / "report.json").read_text())["runs"]) == {"a", "b"}
    assert "learning_curves.png" in capsys.readouterr().out


def test_val_shards_evaluate_each_runs_latest_checkpoint(tmp_path, monkeypatch):
    import student_trainer.evaluate

    fake_run(tmp_path / "runs", "a", [2, 4]), fake_run(tmp_path / "runs", "b", [2, 4])
    evaluated = []

    def evaluate_checkpoint(directory, shards, *, limit=None, device="cpu"):
        evaluated.append((Path(directory).name, shards, limit))
        return {"zero_shot_top1": 0.5 if Path(directory).parent.name == "a" else 0.25, "params": 7, "note": "x"}

    monkeypatch.setattr(student_trainer.evaluate, "evaluate_checkpoint", evaluate_checkpoint)
    doc = write_report([tmp_path / "runs"], tmp_path / "out", baseline="b", val_shards="val-*.tar", eval_limit=9)
    # the snapshot's latest (the second checkpoint written), once per run, with the limit passed on
    assert evaluated == [("checkpoint_2026-12-02_10-00-01.000000", "val-*.tar", 9)] * 2
    assert doc["runs"]["a"]["final"]["zero_shot_top1"] == 0.5 and doc["runs"]["b"]["final"]["zero_shot_top1"] == 0.25
    assert doc["runs"]["a"]["final"]["loss"] == 6.0 and "note" not in doc["runs"]["a"]["final"]


def write_curve(run: Path, top1: list[float], every: int = 2) -> list[dict]:
    """An evaluation curve as `kd train --eval-every` leaves it (student_trainer.step_eval)."""
    points = [{"step": every * (i + 1), "epoch": 1, "samples_seen": 32 * every * (i + 1),
               "train_wall_s": 1.5 * (i + 1), "teacher_s": 0.25 * (i + 1), "eval_s": 0.1, "zero_shot_top1": v}
              for i, v in enumerate(top1)]
    (run / "eval_curve.json").write_text(json.dumps({"points": points}))
    return points


def test_eval_curves_and_steps_to_the_baselines_final(tmp_path, capsys):
    runs = tmp_path / "runs"
    base, fast, slow = fake_run(runs, "base", [6]), fake_run(runs, "fast", [6]), fake_run(runs, "slow", [6])
    write_curve(base, [0.3, 0.5, 0.6])
    write_curve(fast, [0.4, 0.6, 0.7])
    write_curve(slow, [0.2, 0.3, 0.4])
    write_events(fast, {2: {"eval/zero_shot_top1": 0.4}, 64: {"eval_by_samples/zero_shot_top1": 0.4}})
    run = load_run(fast)
    assert [p["step"] for p in run.points] == [2.0, 4.0, 6.0]  # by-samples scalars are not steps
    assert run.series("zero_shot_top1") == ([2.0, 4.0, 6.0], [0.4, 0.6, 0.7])
    doc = write_report([runs], tmp_path / "out", baseline="base")
    assert "eval_curves.png" in doc["plots"] and png_size(tmp_path / "out" / "eval_curves.png")[1] > 400
    reading = doc["time_to_quality"]
    assert (reading["baseline"], reading["zero_shot_top1"]) == ("base", 0.6)
    assert reading["runs"]["fast"] == {"step": 4, "samples_seen": 128, "train_wall_s": 3.0, "teacher_s": 0.5}
    assert reading["runs"]["base"]["step"] == 6 and reading["runs"]["slow"] is None
    assert main(["report", str(runs), "--out", str(tmp_path / "cli"), "--baseline", "base"]) == 0
    out = capsys.readouterr().out
    assert "steps to the baseline's final zero-shot top-1 (0.6000, base):" in out
    assert "  fast: 4 steps, 128 samples, 3.0 s training, 0.5 teacher-s" in out and "  slow: never" in out


def test_without_curves_there_is_no_time_to_quality(tmp_path):
    fake_run(tmp_path / "runs", "a", [2])
    doc = write_report([tmp_path / "runs"], tmp_path / "out", baseline="a")
    assert "time_to_quality" not in doc and "eval_curves.png" not in doc["plots"]
