"""The quality benchmark's arithmetic (benchmarks/methods.py): intervals, seed-paired gains, the
weight grid and the choice of weights — restated here by hand, no Ray."""
from __future__ import annotations

import math

import pytest

from benchmarks import methods


def test_interval_is_the_student_t_95_percent_interval_of_the_mean():
    values = [0.80, 0.86, 0.83]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    t_975_df2 = 4.302652729911275  # table value
    assert methods.interval(values) == pytest.approx((mean, mean - t_975_df2 * sd / math.sqrt(3),
                                                      mean + t_975_df2 * sd / math.sqrt(3)))
    assert methods.interval([0.5]) == (0.5, 0.5, 0.5)


def test_gains_are_paired_by_seed_and_failed_runs_are_left_out():
    base = [{"seed": s, "zero_shot_top1": v, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0}
            for s, v in [(0, 0.60), (1, 0.40), (2, 0.65)]]
    runs = [{"seed": 2, "zero_shot_top1": 0.85, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0},
            {"seed": 0, "zero_shot_top1": 0.80, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0},
            {"seed": 1, "error": "kd train exited 1"}]
    s = methods.summarise(runs, base)
    assert s["runs"] == 2 and s["errors"] == ["kd train exited 1"]
    assert s["gain_zero_shot_top1"] == pytest.approx(0.20)  # (0.85-0.65 + 0.80-0.60) / 2, not vs seed 1
    assert s["gain_zero_shot_top1_lo"] == pytest.approx(0.20) == s["gain_zero_shot_top1_hi"]  # no spread
    assert s["zero_shot_top1"] == pytest.approx(0.825)


def test_the_grid_runs_every_factor_and_the_choice_keeps_the_best_one():
    rows = methods.methods_to_run(False, grid=(0.25, 1.0, 4.0))
    fd = {n: r for n, r in rows.items() if r.get("method") == "fd"}
    assert set(fd) == {"clip + fd ×0.25", "clip + fd", "clip + fd ×4"}
    assert fd["clip + fd ×4"]["losses"]["fd"] == 4 * methods.DEFAULT_WEIGHTS["fd"]
    report = {"methods": fd, "summary": {"clip + fd ×0.25": {"runs": 2, "zero_shot_top1": 0.7},
                                         "clip + fd": {"runs": 2, "zero_shot_top1": 0.6},
                                         "clip + fd ×4": {"runs": 0}}}
    assert methods.choose_factors(report)["fd"]["factor"] == 0.25
    chosen = methods.methods_to_run(False, chosen={"fd": 0.25, "icl": 2.0})
    assert chosen["clip + fd"]["losses"]["fd"] == 0.25 * methods.DEFAULT_WEIGHTS["fd"]
    assert chosen["CLIP-KD (clip+crd+icl+fd)"]["losses"] == {
        "clip": 1.0, "crd": methods.DEFAULT_WEIGHTS["crd"], "icl": 2.0 * methods.DEFAULT_WEIGHTS["icl"],
        "fd": 0.25 * methods.DEFAULT_WEIGHTS["fd"]}


def test_runs_of_an_earlier_report_are_reused_only_for_the_same_row_budget_and_teacher(tmp_path):
    meta = {"epochs": 10, "batch_size": 64, "workers": 2, "teacher_mode": "remote",
            "teacher_fingerprint": "abc", "data_dir": "/d"}
    grid = methods.methods_to_run(False, grid=(0.25, 1.0, 4.0))
    old_rows = methods.methods_to_run(False)
    old = {"meta": meta, "methods": old_rows,
           "runs": {"clip + fd": [{"seed": 0, "zero_shot_top1": 0.7}, {"seed": 1, "error": "exited 1"}],
                    "no teacher (clip)": [{"seed": 1, "zero_shot_top1": 0.6}]}}
    path = tmp_path / "old.json"
    path.write_text(methods.json.dumps(old))
    found = methods.reusable_runs([str(path)], meta, grid)
    assert set(found) == {("clip + fd", 0), ("no teacher (clip)", 1)}  # not the failed run, not ×0.25 / ×4
    assert found["clip + fd", 0]["reused_from"] == str(path)
    changed = {**grid, "clip + fd": {**grid["clip + fd"], "losses": {"clip": 1.0, "fd": 1.0}}}
    assert ("clip + fd", 0) not in methods.reusable_runs([str(path)], meta, changed)
    with pytest.raises(SystemExit, match="epochs is 10, this run's is 5"):
        methods.reusable_runs([str(path)], {**meta, "epochs": 5}, grid)


def test_ensemble_rows_ask_the_second_pool_alone_and_both_pools_at_once():
    rows = methods.ensemble_rows({"icl": 4.0})
    alone, both = rows["clip + icl (teacher 2)"], rows["clip + icl (teachers 1 + 2)"]
    assert alone["losses"] == both["losses"] == {"clip": 1.0, "icl": 4.0 * methods.DEFAULT_WEIGHTS["icl"]}
    tcfg = methods.TeacherConfig(model="ViT-B-32")
    source = methods._teacher_source(alone, "remote", tcfg, False)
    assert source.app_name == methods.APP_2 and not source.sources
    ensemble = methods._teacher_source(both, "remote", tcfg, False)
    assert [m["app_name"] for m in ensemble.sources] == [methods.APP, methods.APP_2]
    assert methods._teacher_source({"losses": {}}, "remote", tcfg, False).app_name == methods.APP


def test_a_calibration_row_is_reused_under_the_report_name_of_the_same_weights(tmp_path):
    meta = {"epochs": 10, "batch_size": 64, "workers": 2, "teacher_mode": "remote",
            "teacher_fingerprint": "abc", "data_dir": "/d"}
    grid = methods.methods_to_run(False, grid=(0.25, 1.0, 4.0))
    old = {"meta": meta, "methods": grid, "runs": {"clip + fd ×0.25": [{"seed": 1, "zero_shot_top1": 0.7}],
                                                   "clip + fd": [{"seed": 1, "zero_shot_top1": 0.6}]}}
    path = tmp_path / "cal.json"
    path.write_text(methods.json.dumps(old))
    report_rows = methods.methods_to_run(False, chosen={"fd": 0.25}, with_inherit=True,
                                         only=["clip + fd", "clip + fd (init from teacher)"])
    assert set(report_rows) == {"clip + fd", "clip + fd (init from teacher)"}
    found = methods.reusable_runs([str(path)], meta, report_rows)
    assert found == {("clip + fd", 1): {"seed": 1, "zero_shot_top1": 0.7, "reused_from": str(path)}}


def test_the_chosen_factors_may_not_replace_the_calibration_report(tmp_path, capsys):
    """--choose naming --out's own JSON would overwrite the per-run report with the factors (it did)."""
    out = tmp_path / "cal.md"
    with pytest.raises(SystemExit):
        methods.main(["--teacher-dir", str(tmp_path), "--out", str(out), "--choose", str(tmp_path / "cal.json")])
    assert "is the report's own JSON" in capsys.readouterr().err
    assert not (tmp_path / "cal.json").exists()


def test_the_rows_take_the_calibrated_weights_and_reused_runs_are_not_trained_again(tmp_path):
    """`main`'s steps before training: the rows at the factors a --choose file picked (with the
    ensemble rows of a second teacher, --only keeping some), then the runs an earlier report made
    under the same budget go into this report and only the others are trained."""
    cal = tmp_path / "weights.json"
    cal.write_text(methods.json.dumps({"methods": {"fd": {"factor": 0.25}}}))
    args = methods.parse_args(["--teacher-dir", str(tmp_path), "--weights-from", str(cal), "--seeds", "0", "1",
                               "--second-teacher-dir", str(tmp_path), "--only", "no teacher (clip)", "clip + fd",
                               "clip + icl (teacher 2)"])
    rows, calibration = methods.rows_to_run(args)
    assert list(rows) == ["no teacher (clip)", "clip + fd", "clip + icl (teacher 2)"]
    assert rows["clip + fd"]["losses"]["fd"] == 0.25 * methods.DEFAULT_WEIGHTS["fd"]
    assert rows["clip + icl (teacher 2)"]["apps"] == [methods.APP_2] and calibration["methods"]["fd"]["factor"] == 0.25

    meta = {"epochs": 10, "batch_size": 64, "workers": 2, "teacher_mode": "remote",
            "teacher_fingerprint": "abc", "data_dir": "/d"}
    old = tmp_path / "old.json"
    old.write_text(methods.json.dumps({"meta": meta, "methods": {"clip + fd": rows["clip + fd"]},
                                       "runs": {"clip + fd": [{"seed": 1, "zero_shot_top1": 0.7}]}}))
    args = methods.parse_args(["--teacher-dir", str(tmp_path), "--seeds", "0", "1", "--reuse-from", str(old)])
    report = {"meta": dict(meta), "methods": rows, "runs": {name: [] for name in rows}}
    items = methods.runs_to_train(args, report)
    assert [(name, seed) for name, _, seed in items] == [(n, s) for s in (0, 1) for n in rows if (n, s) != ("clip + fd", 1)]
    assert report["runs"]["clip + fd"] == [{"seed": 1, "zero_shot_top1": 0.7, "reused_from": str(old)}]
    assert report["meta"]["reused_runs"] == 1
    assert methods.runs_to_train(methods.parse_args(["--teacher-dir", str(tmp_path), "--cost-only"]), report) == []


def test_the_arguments_are_refused_before_anything_starts_and_the_grid_rows_follow_the_flags(tmp_path, capsys):
    """`parse_args` refuses a run with no teacher (but not --render-only, which trains nothing);
    `rows_to_run` without a calibration gives every grid factor, SigLIP and each row's inherit twin."""
    with pytest.raises(SystemExit):
        methods.parse_args(["--out", str(tmp_path / "m.md")])
    assert "--teacher-dir is required" in capsys.readouterr().err
    assert methods.parse_args(["--render-only", "--out", str(tmp_path / "m.md")]).teacher_dir is None

    args = methods.parse_args(["--teacher-dir", str(tmp_path), "--grid", "0.5", "2", "--with-siglip",
                               "--with-inherit", "--only", "no teacher (siglip)", "clip + kl ×0.5",
                               "clip + kl ×2 (init from teacher)"])
    rows, calibration = methods.rows_to_run(args)
    assert calibration is None
    assert list(rows) == ["no teacher (siglip)", "clip + kl ×0.5", "clip + kl ×2 (init from teacher)"]
    assert rows["no teacher (siglip)"]["losses"] == {"siglip": 1.0} and not rows["no teacher (siglip)"]["teacher"]
    assert rows["clip + kl ×0.5"]["losses"]["kl"] == 0.5 * methods.DEFAULT_WEIGHTS["kl"]
    assert not rows["clip + kl ×0.5"]["inherit"] and rows["clip + kl ×2 (init from teacher)"]["inherit"]
    with pytest.raises(SystemExit, match="unknown --only rows"):
        methods.rows_to_run(methods.parse_args(["--teacher-dir", str(tmp_path), "--only", "clip + kl ×3"]))


def _run(seed: int, final: float, curve: list[tuple[int, float]]) -> dict:
    return {"seed": seed, "zero_shot_top1": final, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0,
            "curve": [{"step": s, "samples_seen": 64 * s, "train_wall_s": 2.0 * s, "teacher_s": 0.5 * s,
                       "zero_shot_top1": v} for s, v in curve]}


def test_the_results_rows_give_each_seeds_steps_to_the_baseline_final_and_the_paired_gain(tmp_path):
    """Target: the no-teacher rows' mean final (0.5 + 0.7) / 2 = 0.6. The distilled seed 0 first
    reaches it at step 20 (0.65), seed 1 never does; the baseline's seed 0 never (it ends at 0.5), seed 1 at 10."""
    base = [_run(0, 0.5, [(10, 0.3), (20, 0.5)]), _run(1, 0.7, [(10, 0.6), (20, 0.7)])]
    kd = [_run(0, 0.65, [(10, 0.55), (20, 0.65)]), _run(1, 0.59, [(10, 0.4), (20, 0.59)])]
    rows = methods.methods_to_run(False, only=["no teacher (clip)", "clip + icl"])
    meta = {"date": "d", "command": "c", "machine": "2-core CPU", "epochs": 2, "batch_size": 64, "workers": 2,
            "global_batch": 128, "seeds": [0, 1], "student_params": 1000, "teacher_dir": "/t", "teacher_mode": "remote",
            "eval_every": 10}
    report = {"meta": {**meta, "teacher_model": "t", "teacher_fingerprint": "fp", "teacher_eval": {"zero_shot_top1": 0.8}},
              "methods": rows, "runs": {"no teacher (clip)": base, "clip + icl": kd}}
    out = tmp_path / "fashion.md"
    methods.save(report, out)
    doc = methods.json.loads(out.with_suffix(".json").read_text())
    assert doc["teacher"] == {"model": "t", "fingerprint": "fp", "zero_shot_top1": 0.8}
    by_name = {r["name"]: r for r in doc["rows"]}
    icl = by_name["clip + icl"]
    assert icl["seeds"] == [0, 1] and icl["zero_shot_top1"] == [0.65, 0.59]
    assert icl["steps_to_baseline_final"] == [20, None]
    assert icl["losses"] == {"clip": 1.0, "icl": methods.DEFAULT_WEIGHTS["icl"]}
    gains = [0.65 - 0.5, 0.59 - 0.7]
    mean, sd = sum(gains) / 2, abs(gains[0] - gains[1]) / math.sqrt(2)
    half = 12.706204736174707 * sd / math.sqrt(2)  # t(0.975, 1 df)
    assert icl["gain_vs_baseline_ci95"] == pytest.approx([mean - half, mean + half])
    assert by_name["no teacher (clip)"]["steps_to_baseline_final"] == [None, 10]
    assert by_name["no teacher (clip)"]["gain_vs_baseline_ci95"] is None
    ttq = doc["time_to_baseline"]["clip + icl"]
    assert (ttq["threshold"], ttq["reached"], ttq["step"], ttq["teacher_s"]) == (pytest.approx(0.6), 1, 20, 10.0)
    text = out.read_text()
    assert "| clip + icl | 1 of 2 | 20 | 1280 | 40 | 10.0 |" in text


def test_pure_distillation_has_no_contrastive_task_loss():
    rows = methods.methods_to_run(False, chosen={"kl": 4.0})
    assert rows[methods.PURE]["losses"] == {"kl": 4.0 * methods.DEFAULT_WEIGHTS["kl"]}
    assert rows[methods.PURE]["teacher"] is True


def test_selection_rows_train_the_default_recipe_k_times_the_epochs_and_are_told_apart(tmp_path, capsys):
    """`--selection SCORE:K`: the default recipe without and with each selection, a selection row
    trained epochs × K epochs (an epoch is one pass in super-batches of K × batch) and never taken
    for a run of the same losses without selection."""
    args = methods.parse_args(["--teacher-dir", str(tmp_path), "--epochs", "3",
                               "--only", "no teacher (clip)", "--selection", "teacher_loss:4", "uniform:2"])
    rows, _ = methods.rows_to_run(args)
    assert list(rows) == ["no teacher (clip)", "default recipe", "default recipe, select teacher_loss k=4",
                          "default recipe, select uniform k=2"]
    cfgs = {name: methods.train_cfg(args, tmp_path, name, rows[name], 0, None) for name in rows}
    assert [(c.epochs, c.selection.score, c.selection.k) for c in cfgs.values()] == [
        (3, "uniform", 1), (3, "uniform", 1), (12, "teacher_loss", 4), (6, "uniform", 2)]
    assert cfgs["default recipe"].losses == methods.DEFAULT_DISTILL_LOSSES
    assert methods._spec_key(rows["default recipe"]) != methods._spec_key(rows["default recipe, select uniform k=2"])
    report = {"meta": {}, "summary": {}, "methods": rows, "runs": {name: [] for name in rows}}
    assert [r.get("selection") for r in methods.result_rows(report)["rows"]] == [
        None, None, {"score": "teacher_loss", "k": 4}, {"score": "uniform", "k": 2}]
    for bad in ("teacher_loss", "loss:2", "learnability:1"):
        with pytest.raises(SystemExit):
            methods.parse_args(["--teacher-dir", str(tmp_path), "--selection", bad])
    assert "expected SCORE:K" in capsys.readouterr().err


def test_the_selection_section_shows_each_rows_cost_and_its_gain_paired_with_the_default_recipe():
    def run(seed, top1, **figures):
        return {"seed": seed, "zero_shot_top1": top1, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0, **figures}

    rows = methods.selection_rows([("teacher_loss", 2)])
    picked = "default recipe, select teacher_loss k=2"
    report = {"methods": {methods.BASELINE: {}, **rows}, "runs": {
        methods.BASELINE: [run(0, 0.60), run(1, 0.64)],
        "default recipe": [run(0, 0.70), run(1, 0.72)],
        picked: [run(0, 0.75, step=20, samples_seen=2560, samples_trained=1280, teacher_s=3.0,
                     selection_bytes=2_000_000), run(1, 0.79, step=20, teacher_s=5.0)]}}
    text = "\n".join(methods.selection_lines(report))
    cells = [c.strip() for c in next(line for line in text.splitlines()
                                     if line.startswith(f"| {picked} |")).split("|")[1:-1]]
    assert cells[1:4] == ["20", "2560 / 1280", "4.0"] and cells[6] == "2.0"  # one seed recorded bytes: 2 MB
    assert cells[8].startswith("+6.0 [")  # gains 0.05 and 0.07 over the same seeds' default recipe
    assert cells[9] == "2"
    assert methods.selection_lines({"methods": {methods.BASELINE: {}}, "runs": {}}) == []


def test_answer_dtype_rows_ask_the_pool_for_their_dtype_and_are_paired_with_fp16(tmp_path):
    """`--answer-dtypes`: the default recipe again with its teacher answering in each dtype, never
    taken for an fp16 run, an fp16 run of an older report still reused as the default recipe, and
    each dtype's gain paired by seed with the fp16 run."""
    args = methods.parse_args(["--teacher-dir", str(tmp_path), "--only", "no teacher (clip)",
                               "--answer-dtypes", "int8", "bf16"])
    rows, _ = methods.rows_to_run(args)
    assert list(rows) == ["no teacher (clip)", "default recipe", "default recipe, int8 answers",
                          "default recipe, bf16 answers"]
    cfgs = {name: methods.train_cfg(args, tmp_path, name, rows[name], 0, None) for name in rows}
    assert [cfgs[n].teacher.answer_dtype for n in rows] == [None, None, "int8", "bf16"]
    keys = {methods._spec_key(spec) for spec in rows.values()}
    assert len(keys) == 4
    old_fp16 = {"losses": dict(methods.DEFAULT_DISTILL_LOSSES), "teacher": True, "overrides": {}, "inherit": False}
    assert methods._spec_key(old_fp16) == methods._spec_key(rows["default recipe"])
    assert methods._spec_key({**old_fp16, "answer_dtype": "fp16"}) == methods._spec_key(old_fp16)
    report = {"meta": {}, "summary": {}, "methods": rows, "runs": {name: [] for name in rows}}
    assert [r["answer_dtype"] for r in methods.result_rows(report)["rows"]] == ["fp16", "fp16", "int8", "bf16"]

    def run(seed, top1):
        return {"seed": seed, "zero_shot_top1": top1, "zero_shot_top5": 1, "i2t_r1": 0, "t2i_r1": 0}

    report["runs"].update({"default recipe": [run(0, 0.70), run(1, 0.72)],
                           "default recipe, int8 answers": [run(0, 0.69), run(1, 0.70)]})
    text = "\n".join(methods.answer_dtype_lines(report))
    cells = [c.strip() for c in next(line for line in text.splitlines()
                                     if line.startswith("| default recipe, int8 answers |")).split("|")[1:-1]]
    assert cells[1] == "int8" and cells[3].startswith("-1.5 [") and cells[4] == "2"
    assert "| default recipe, bf16 answers | bf16 | not run |" in text
    with pytest.raises(SystemExit):
        methods.parse_args(["--teacher-dir", str(tmp_path), "--answer-dtypes", "fp8"])
