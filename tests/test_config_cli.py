"""Run configuration round trips and the `kd` command line surface."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cluster.cli import build_parser, main
from student_trainer.config import DataConfig, TrainConfig
from student_trainer.scheduler import warmup_cosine


def test_train_config_yaml_round_trip(tmp_path):
    cfg = TrainConfig(run_name="r1", losses={"clip": 1.0, "kl": 0.5})
    cfg.data.train_shards = "data/train-*.tar"
    cfg.teacher.mode = "remote"
    cfg.optim.betas = (0.9, 0.95)
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    again = TrainConfig.from_yaml(path)
    assert again == cfg
    assert again.optim.betas == (0.9, 0.95)


def test_train_config_is_written_atomically_over_an_old_one(tmp_path):
    """A new file moved into place, never the old one rewritten in place: a reader that opened the old
    config still reads all of it, and no temporary is left beside it."""
    path = tmp_path / "run.yaml"
    TrainConfig(run_name="old").to_yaml(path)
    with open(path) as reader:
        TrainConfig(run_name="new").to_yaml(path)
        assert "run_name: old" in reader.read()
    assert TrainConfig.from_yaml(path).run_name == "new"
    assert os.listdir(tmp_path) == ["run.yaml"]


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="data.batchsize"):
        TrainConfig.from_dict({"data": {"batchsize": 3}})


@pytest.mark.parametrize("change, message", [
    ({"run_name": "bad name/.."}, "run_name"),
    ({"teacher": {"mode": "sometimes"}}, "teacher.mode"),
    ({"teacher": {"mode": "inline"}}, "teacher.teacher"),
    ({"teacher": {"mode": "remote", "send_pixels": "never"}}, "teacher.send_pixels"),
    ({"epochs": 0}, "epochs"),
    ({"losses": {"clip": 0.0}}, "losses"),
])
def test_validate_names_the_bad_field(change, message):
    data = {"data": {"train_shards": "x/*.tar"}, **change}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data).validate()


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, base_lr=1.0, warmup_steps=10, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-3


def command_parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(words, parser) for `kd` and every command and subcommand under it, walked from the real parser."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_parsers(sub, (*words, name))


COMMANDS = [words for words, _ in command_parsers(build_parser())]


def test_the_command_walk_finds_nested_commands():
    assert {(), ("train",), ("teacher",), ("teacher", "serve"), ("cache", "info"), ("data", "digits")} <= set(COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "kd")
def test_every_command_has_help(words, capsys):
    """`kd ... --help` exits 0 and explains the command: its usage line and its own description."""
    description = dict(command_parsers(build_parser()))[words].description
    assert description and description.strip(), f"`kd {' '.join(words)}` has no description"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(" ".join(["usage: kd", *words]))
    assert "".join(description.split()) in "".join(out.split())  # wrapped (also at hyphens), but all there
    assert len(out.splitlines()) > 3


def test_kd_works_without_the_benchmarks_package_and_kd_bench_still_checks_its_choices(capsys):
    """Only `kd bench` reaches the measurement package: with `benchmarks` unimportable every other
    command still parses; `kd bench` refuses a value outside the suite's lists and its help names them all."""
    hide = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'benchmarks' or name.startswith('benchmarks.'):\n"
            "        raise ImportError('benchmarks hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from cluster.cli import build_parser\n"
            "args = build_parser().parse_args(['train', '--config', 'x.yaml'])\n"
            "print(args.func.__name__, 'benchmarks' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cmd_train", "False"]
    from benchmarks.suite.config import MODES, PRESETS, SECTIONS

    args = build_parser().parse_args(["bench", "--preset", "cpu", "--sections", "pool", "cache", "--modes", "hybrid"])
    assert (args.preset, args.sections, args.modes) == ("cpu", ["pool", "cache"], ["hybrid"])
    assert build_parser().parse_args(["bench"]).preset == "smoke"
    for bad in (["--preset", "huge"], ["--sections", "pool", "disk"], ["--modes", "remote", "ray"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["bench", *bad])
        assert exit_info.value.code == 2
        assert f"invalid choice: {bad[-1]!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in (*PRESETS, *SECTIONS, *MODES):
        assert name in out


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("data", "teacher", "train", "eval", "demo"):
        assert word in proc.stdout


def test_bad_loss_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--loss", "kl=abc"])
    assert "NAME=WEIGHT" in capsys.readouterr().err


def test_data_folder_error_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "caps.csv").write_text("image,caption\n")
    code = main(["data", "folder", "--images", str(tmp_path / "imgs"), "--captions",
                 str(tmp_path / "caps.csv"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "kd: error:" in capsys.readouterr().err


def test_kd_data_digits_then_eval_a_checkpoint(tmp_path, capsys):
    import json

    from student_trainer.checkpoint import save_student
    from student_trainer.config import ModelConfig
    from student_trainer.factory import create_student

    data = tmp_path / "data"
    assert main(["data", "digits", "--out", str(data), "--samples-per-shard", "500"]) == 0
    assert sorted(p.name for p in data.glob("val-*.tar")) == ["val-000000.tar"]
    assert len(list(data.glob("train-*.tar"))) == 3  # 1437 train samples / 500
    capsys.readouterr()

    cfg = ModelConfig(name="digits-student")
    checkpoint = tmp_path / "run" / "checkpoint_000001"  # where Ray Train stores a run's checkpoints
    save_student(create_student(cfg), cfg, checkpoint)
    (checkpoint / "metrics.json").write_text(json.dumps({"step": 7}))
    (tmp_path / "run" / "tensorboard").mkdir()
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards",
                 str(data / "val-*.tar"), "--limit", "40"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["samples"] == 40
    for key in ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["zero_shot_top5"] >= metrics["zero_shot_top1"]

    # the evaluation joins the run's TensorBoard curves at the checkpoint's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert metrics["tensorboard"] == str(tmp_path / "run" / "tensorboard")
    events = EventAccumulator(metrics["tensorboard"])
    events.Reload()
    assert {"eval/zero_shot_top1", "eval/i2t_r1", "eval/t2i_r10"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("eval/zero_shot_top1")] == [
        (7, round(metrics["zero_shot_top1"], 4))]


def test_kd_eval_needs_exactly_one_model(tmp_path, capsys):
    assert main(["eval", "--shards", str(tmp_path)]) == 2
    assert "kd: error: kd eval: give exactly one of --checkpoint or --teacher-config" in capsys.readouterr().err


def test_sweep_refuses_duplicate_run_names(tmp_path):
    from cluster.sweep import load_sweep_configs

    paths = []
    for i in range(2):
        cfg = TrainConfig(run_name="same-name")
        cfg.data.train_shards = "data/train-*.tar"
        paths.append(str(tmp_path / f"run{i}.yaml"))
        cfg.to_yaml(paths[-1])
    with pytest.raises(ValueError, match="same-name"):
        load_sweep_configs(paths)


def test_sweep_reads_the_train_summary():
    from cluster.sweep import _last_json

    lines = ["(RayTrainWorker) {'a': 1}\n", "{\n", '  "run_name": "a",\n',
             '  "metrics": {"epoch": 2}\n', "}\n"]
    assert _last_json(lines) == {"run_name": "a", "metrics": {"epoch": 2}}
    assert _last_json(lines[:-1]) is None  # a run killed mid-summary has no metrics
    late = lines + ["(PlacementGroupCleaner pid=1) Failed to query Ray Train Controller actor state.\n"]
    assert _last_json(late) == {"run_name": "a", "metrics": {"epoch": 2}}  # Ray log lines after the summary
    assert _last_json(["no summary at all\n"]) is None


def test_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray Train workers and Serve replicas do not run in the driver's directory."""
    from teacher_service.config import TeacherConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"")
    cfg = TrainConfig(storage_path="runs")
    cfg.data.train_shards = "data/train-{000000..000003}.tar"
    cfg.data.val_shards = "s3://bucket/val-*.tar"
    cfg.teacher.cache_path = "cache"
    cfg.teacher.teacher = TeacherConfig(pretrained="openai")
    absolute = cfg.with_absolute_paths()
    assert absolute.storage_path == str(tmp_path / "runs")
    assert absolute.data.train_shards == str(tmp_path / "data/train-{000000..000003}.tar")
    assert absolute.data.val_shards == "s3://bucket/val-*.tar"  # URLs untouched
    assert absolute.teacher.cache_path == str(tmp_path / "cache")
    assert absolute.teacher.teacher.pretrained == "openai"  # a tag, not a file
    assert cfg.storage_path == "runs"  # the original is not modified
    assert TeacherConfig(pretrained="teacher.pt").pretrained == str(tmp_path / "teacher.pt")


def test_train_flags_override_the_yaml(tmp_path):
    from cluster.cli.train import train_config_from_args

    base = TrainConfig(run_name="from-yaml", epochs=3, losses={"clip": 1.0})
    base.data.train_shards = "yaml/train-*.tar"
    base.data.batch_size = 32
    path = tmp_path / "run.yaml"
    base.to_yaml(path)
    args = build_parser().parse_args([
        "train", "--config", str(path), "--run-name", "from-flags", "--train-shards", "flags/*.tar",
        "--teacher-mode", "hybrid", "--cache-path", "cache", "--num-views", "2", "--workers", "3",
        "--student", "digits-student", "--loss", "clip", "--loss", "kl=0.5", "--use-gpu"])
    cfg = train_config_from_args(args)
    assert (cfg.run_name, cfg.num_workers, cfg.use_gpu) == ("from-flags", 3, True)
    assert (cfg.data.train_shards, cfg.data.num_views) == ("flags/*.tar", 2)
    assert (cfg.teacher.mode, cfg.teacher.cache_path, cfg.model.name) == ("hybrid", "cache", "digits-student")
    assert cfg.losses == {"clip": 1.0, "kl": 0.5}
    # flags not given keep the YAML's values
    assert (cfg.epochs, cfg.data.batch_size, cfg.teacher.app_name) == (3, 32, "kd-teacher")
    assert not train_config_from_args(build_parser().parse_args(["train", "--config", str(path)])).use_gpu


def test_max_steps_per_epoch_flag_and_its_deprecated_former_name(capsys):
    """`--max-steps` set max_steps_per_epoch under a name that said otherwise: it still works, hidden
    from --help, with one line naming the flag to use."""
    from cluster.cli.train import train_config_from_args

    def parsed(*flags: str) -> TrainConfig:
        return train_config_from_args(build_parser().parse_args(["train", "--train-shards", "x", *flags]))

    assert parsed("--max-steps-per-epoch", "4").max_steps_per_epoch == 4
    assert capsys.readouterr().err == ""
    assert parsed("--max-steps", "3").max_steps_per_epoch == 3
    assert capsys.readouterr().err == "kd: warning: --max-steps is deprecated, use --max-steps-per-epoch\n"
    assert parsed().max_steps_per_epoch is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "--max-steps-per-epoch" in out and "--max-steps " not in out and "--max-steps\n" not in out


def test_teacher_serve_flags_pick_a_fixed_or_an_autoscaled_pool(tmp_path):
    from cluster.cli import build_parser
    from cluster.cli.teacher import teacher_config_from_args
    from teacher_service.config import ServingConfig, TeacherConfig

    path = tmp_path / "teacher.yaml"
    TeacherConfig(serving=ServingConfig(autoscaling={"min_replicas": 1, "max_replicas": 3})).to_yaml(path)

    def cfg(*flags):
        return teacher_config_from_args(build_parser().parse_args(["teacher", "serve", "--config", str(path), *flags]))

    assert cfg().serving.serve_options()["autoscaling_config"]["max_replicas"] == 3
    fixed = cfg("--replicas", "2").serving.serve_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    scaled = cfg("--autoscale", '{"min_replicas": 2, "max_replicas": 5}').serving.serve_options()
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5}
    with pytest.raises(ValueError, match="max_replicas explicitly"):
        cfg("--autoscale", '{"min_replicas": 2}')
    assert cfg().serving.shard_roots == [] and cfg("--shard-root", "data", "--shard-root",
                                                   "/mnt/shards").serving.shard_roots == [os.path.abspath("data"),
                                                                                          "/mnt/shards"]
    every = cfg("--model", "ViT-S-16", "--precision", "fp16", "--app-name", "kd-x", "--num-cpus", "2", "--num-gpus",
                "1", "--max-batch-size", "128", "--grpc-port", "0", "--grpc-health-port", "7001")
    assert (every.model, every.precision, every.grpc.port, every.grpc.health_port) == ("ViT-S-16", "fp16", 0, 7001)
    assert (every.serving.app_name, every.serving.num_cpus, every.serving.num_gpus, every.serving.max_batch_size) == \
        ("kd-x", 2.0, 1.0, 128)


def test_flat_teacher_configs_in_a_run_config_warn_once(tmp_path):
    """A run config written before the teacher config's sections (flat keys under `teacher.teacher`
    and `teacher.sources[i].teacher`) loads with one deprecation line for the whole file; the
    config's later parsing (validate, members) says nothing more."""
    import warnings

    import yaml

    flat = {"model": "ViT-B-32", "max_batch_size": 64, "grpc_port": 0}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_shards": "data/train-*.tar"}, "teacher": {
        "mode": "inline", "teacher": flat,
        "sources": [{"name": "a", "teacher": {"model": "ViT-B-32", "num_cpus": 0.5}}, {"name": "b"}]}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = TrainConfig.from_yaml(path).validate()
        members = cfg.teacher.members()
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    said = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert said == ["run config: flat keys are deprecated: teacher.teacher.grpc_port -> teacher.teacher.grpc.port, "
                    "teacher.teacher.max_batch_size -> teacher.teacher.serving.max_batch_size, "
                    "teacher.sources[0].teacher.num_cpus -> teacher.sources[0].teacher.serving.num_cpus"]
    assert (cfg.teacher.teacher.serving.max_batch_size, cfg.teacher.teacher.grpc.port) == (64, 0)
    assert [m.teacher.serving.num_cpus for m in members] == [0.5, 1.0]  # "b" has the config's own teacher
    with pytest.raises(ValueError, match=r"teacher.teacher: unknown keys \['serving.bogus'\]"):
        TrainConfig.from_dict({"teacher": {"teacher": {"serving": {"bogus": 1}}}})


def test_writes_outside_the_configured_roots_are_refused(tmp_path, monkeypatch):
    from student_trainer.config import TeacherSourceConfig, TrainConfig

    root = tmp_path / "kd"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")

    def cfg(storage, cache=None, roots=(str(root),)):
        mode = "hybrid" if cache else "none"
        return TrainConfig(
            storage_path=str(storage), write_roots=list(roots),
            teacher=TeacherSourceConfig(mode=mode, cache_path=str(cache) if cache else None))

    def validate(c):
        c.data.train_shards = "x"
        return c.validate()

    validate(cfg(root / "runs", root / "cache"))
    for storage in (tmp_path / "elsewhere", root / ".." / "elsewhere", root / "escape" / "runs"):
        with pytest.raises(ValueError, match="storage_path .* is outside the write roots"):
            validate(cfg(storage))
    with pytest.raises(ValueError, match="teacher.cache_path .* is outside"):
        validate(cfg(root / "runs", tmp_path / "elsewhere" / "cache"))
    validate(cfg(tmp_path / "anywhere", roots=()))  # no roots configured: no restriction
    monkeypatch.setenv("KD_WRITE_ROOTS", str(root))
    with pytest.raises(ValueError, match="KD_WRITE_ROOTS"):
        validate(cfg(tmp_path / "anywhere", roots=()))


def test_a_run_that_names_no_losses_gets_clip_alone_or_the_distillation_recipe(tmp_path):
    from student_trainer.config import DEFAULT_DISTILL_LOSSES, TeacherSourceConfig

    data = DataConfig(train_shards="data/train")
    assert TrainConfig(run_name="plain", data=data).validate().losses == {"clip": 1.0}
    remote = TrainConfig(run_name="kd", data=data, teacher=TeacherSourceConfig(mode="remote")).validate()
    assert remote.losses == DEFAULT_DISTILL_LOSSES and remote.losses is not DEFAULT_DISTILL_LOSSES
    assert "icl" in DEFAULT_DISTILL_LOSSES  # the benchmark's best method on the digits task
    named = TrainConfig(run_name="kd", data=data, teacher=TeacherSourceConfig(mode="remote"),
                        losses={"clip": 1.0, "kl": 1.0})
    assert named.validate().losses == {"clip": 1.0, "kl": 1.0}


@pytest.mark.parametrize("command", [["train"], ["demo"], ["sweep", "a.yaml"],
                                     ["precompute", "--shards", "s", "--out", "o"]])
def test_commands_that_run_ray_work_are_quiet_unless_verbose(command):
    assert build_parser().parse_args(command).verbose is False
    assert build_parser().parse_args(command + ["--verbose"]).verbose is True
    assert build_parser().parse_args(command + ["-v"]).verbose is True


def _snapshot(step: int, epoch: int = 1):
    from student_trainer.progress import StepSnapshot

    return StepSnapshot(step=step, total_steps=20, start_step=0, epoch=epoch, epochs=2, epoch_step=(step - 1) % 10 + 1,
                        steps=10, elapsed_s=2.0 * step, samples_per_s=64.0, teacher_wait_s=0.5 * step,
                        losses={"loss": 3.0, "clip_loss": 2.0, "kl_loss": 1.0})


def test_progress_line_off_a_terminal_prints_per_epoch_and_then_every_few_seconds():
    import io

    from student_trainer.progress import ProgressLine, format_progress

    assert format_progress(_snapshot(5)) == ("epoch 1/2 step 5/10 | 64.0 samples/s | loss 3.0000 | "
                                             "teacher wait 2.5s (25%) | ETA 0:30")
    out = io.StringIO()
    line = ProgressLine("run-a", stream=out, every_s=3600, live=False)
    for step in range(1, 21):
        line.update(_snapshot(step, epoch=1 if step <= 10 else 2))
    line.summary = "[run-a] done"
    line.close()
    assert out.getvalue().splitlines() == [f"[run-a] {format_progress(_snapshot(1))}",
                                           f"[run-a] {format_progress(_snapshot(11, epoch=2))}", "[run-a] done"]

    bar = io.StringIO()  # on a terminal: one bar redrawn in place, then the summary
    line = ProgressLine("run-a", stream=bar, live=True)
    for step in range(1, 21):
        line.update(_snapshot(step, epoch=1 if step <= 10 else 2))
    line.summary = "[run-a] done"
    line.close()
    drawn = bar.getvalue().split("\n")
    assert drawn[-2:] == ["[run-a] done", ""] and drawn[0].count("\r") >= 20
    assert drawn[0].rsplit("\r", 1)[-1].startswith(f"[run-a] {format_progress(_snapshot(20, epoch=2))} ####")


def test_forwarded_serve_info_lines_are_dropped_and_everything_else_printed():
    from cluster.local import without_serve_info

    printed: list[dict] = []
    show = without_serve_info(printed.append)
    access = "INFO 2026-12-04 14:38:04,183 kd-teacher_TeacherDeployment 3wvo2n8l -- CALL embed OK 10.4ms"
    warn = "WARNING 2026-12-04 14:38:05,001 controller 12 -- Deployment is unhealthy"
    show({"actor_name": "ServeReplica:kd-teacher:TeacherDeployment", "pid": 1, "lines": [access, warn]})
    show({"actor_name": "ServeController", "pid": 2, "lines": [access.replace("CALL", "Deploying")]})
    show({"actor_name": "ProxyActor", "pid": 3, "lines": ["  DEBUG x"]})
    show({"actor_name": "RayTrainWorker", "pid": 4, "lines": [access]})  # not Serve's: as Ray prints it
    show({"actor_name": None, "task_name": "f", "pid": 5, "lines": ["INFO from a task"]})
    # Ray's own notice that Ray Train's PreemptionWatcher has restarts: dropped; other errors kept
    notice = ("[2026-12-06 20:59:55,713 E 27852 27914] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '0e9da11f' has constructor arguments in the object store and "
              "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
              "restart will fail.")
    error = "[2026-12-06 20:59:56,000 E 27852 27914] core_worker.cc:999: something that matters"
    show({"actor_name": "TrainController", "pid": 6, "lines": [notice]})
    show({"actor_name": "TrainController", "pid": 7, "lines": [notice, error]})
    assert [(d["pid"], d["lines"]) for d in printed] == [(1, [warn]), (4, [access]), (5, ["INFO from a task"]),
                                                         (7, [error])]


def test_quiet_console_keeps_warnings_on_the_console_and_everything_in_files(tmp_path):
    import io
    import logging

    from student_trainer.progress import quiet_console

    logger = logging.getLogger("kd-test-quiet")
    console, file = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "all.log")
    logger.addHandler(console), logger.addHandler(file)
    logger.setLevel(logging.INFO)
    try:
        quiet_console("kd-test-quiet")
        quiet_console("kd-test-quiet")  # twice: still one filter
        logger.info("Reporting training result 1: {...}")
        logger.warning("teacher slow")
        logger.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    finally:
        logger.removeHandler(console), logger.removeHandler(file)
        file.close()
    assert console.stream.getvalue().splitlines() == ["teacher slow"] and len(console.filters) == 1
    assert len((tmp_path / "all.log").read_text().splitlines()) == 3
