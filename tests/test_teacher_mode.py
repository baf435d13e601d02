"""The teacher mode as a type: one registry of source classes, facts per mode, plain strings out."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from cluster.cli import build_parser
from student_trainer.config import TeacherSourceConfig, TrainConfig
from student_trainer.teacher.modes import TeacherMode


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct} | _subclasses(direct)}


def test_every_mode_has_one_source_class_and_every_source_class_a_mode():
    from student_trainer.teacher import sources

    assert set(sources.SOURCES) == set(TeacherMode)
    assert all(cls.mode is mode for mode, cls in sources.SOURCES.items())
    # a public source class of the module that is not registered (the ensemble has no mode of its own)
    public = {cls for cls in _subclasses(sources.TeacherSource)
              if cls.__module__ == sources.__name__ and not cls.__name__.startswith("_")}
    assert public - {sources.MultiTeacher} == set(sources.SOURCES.values())
    assert sources.source_class("hybrid") is sources.HybridTeacher
    with pytest.raises(ValueError, match=r"teacher mode 'grpc': expected one of \('none', 'inline', 'remote'"):
        sources.source_class("grpc")


def test_each_mode_says_what_it_needs_and_can_do():
    facts = ("gives_outputs", "loads_teacher", "needs_app", "reads_cache", "writes_cache", "cache_only",
             "can_lose_teacher", "computes_centroids")
    table = {mode.value: tuple(name for name in facts if getattr(mode, name)) for mode in TeacherMode}
    assert table == {
        "none": (),
        "inline": ("gives_outputs", "loads_teacher", "computes_centroids"),
        "remote": ("gives_outputs", "needs_app", "can_lose_teacher", "computes_centroids"),
        "cache": ("gives_outputs", "reads_cache", "cache_only"),
        "hybrid": ("gives_outputs", "needs_app", "reads_cache", "writes_cache", "can_lose_teacher",
                   "computes_centroids"),
    }


def test_a_built_source_answers_its_modes_facts():
    from student_trainer.teacher.sources import NoTeacher, make_teacher_source

    source = make_teacher_source(TeacherSourceConfig(mode="none"), run="r")
    assert isinstance(source, NoTeacher) and source.mode is TeacherMode.NONE
    assert (source.can_lose_teacher, source.computes_centroids) == (False, False)


def test_strings_in_modes_in_plain_strings_out(tmp_path):
    """Old YAML and code give strings; the config holds TeacherModes; everything written is a plain str."""
    path = tmp_path / "run.yaml"
    path.write_text("data: {train_shards: x/*.tar}\nteacher:\n  mode: hybrid\n  cache_path: c\n"
                    "  sources: [{name: a, app_name: a}, {name: b, mode: cache, cache_teacher: f}]\n")
    cfg = TrainConfig.from_yaml(path).validate()
    assert cfg.teacher.mode is TeacherMode.HYBRID and cfg.teacher.mode == "hybrid"
    assert [m.mode for m in cfg.teacher.members()] == [TeacherMode.HYBRID, TeacherMode.CACHE]
    cfg.teacher.mode = "remote"  # assigned as a string (the CLI's flags, tests, users' code)
    assert cfg.teacher.mode is TeacherMode.REMOTE
    plain = cfg.to_dict()
    assert type(plain["teacher"]["mode"]) is str and plain["teacher"]["mode"] == "remote"
    assert type(plain["teacher"]["sources"][1]["mode"]) is str
    cfg.to_yaml(path)  # yaml.safe_dump refuses Enum subclasses: this fails if one leaks out
    assert "mode: remote" in path.read_text() and "TeacherMode" not in path.read_text()
    again = TrainConfig.from_yaml(path)
    assert again == cfg and again.teacher.members() == cfg.teacher.members()
    assert json.loads(json.dumps(plain)) == plain


def test_provenance_records_the_mode_as_a_plain_string():
    from student_trainer.checkpoint import provenance

    cfg = TrainConfig.from_dict({"data": {"train_shards": "x/*.tar"},
                                 "teacher": {"mode": "remote", "app_name": "kd-t"}}).validate()
    record = provenance(cfg, {"fingerprint": "fp", "model": "m"})
    assert record["teacher"]["mode"] == "remote" and type(record["teacher"]["mode"]) is str
    assert record["teacher"]["app_name"] == "kd-t"
    assert "mode: remote" in yaml.safe_dump(record)


@pytest.mark.parametrize("data, message", [
    ({"teacher": {"mode": "grpc"}}, r"teacher.mode 'grpc': expected one of \('none', 'inline', 'remote', 'cache', "
                                    r"'hybrid'\)"),
    ({"teacher": {"mode": "remote", "sources": [{"app_name": "a"}, {"app_name": "b", "mode": "rmote"}]}},
     r"teacher.sources\[1\].mode 'rmote': expected one of"),
    ({"teacher": {"mode": "cache"}}, r"teacher.mode 'cache' needs teacher.cache_path"),
])
def test_a_bad_mode_names_the_field_and_the_valid_modes(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data": {"train_shards": "x/*.tar"}, **data}).validate()
    with pytest.raises(ValueError, match=r"teacher.mode 'grpc': expected one of"):
        TeacherSourceConfig().mode = "grpc"


def _mode_choices(parser: argparse.ArgumentParser, command: str = "") -> dict[str, list]:
    """Every teacher-mode flag of every command: {'train --teacher-mode': choices, ...}."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_mode_choices(sub, f"{command} {name}".strip()))
        elif "mode" in action.dest and action.choices is not None:
            found[f"{command} {action.option_strings[0]}"] = list(action.choices)
    return found


def test_every_teacher_mode_flag_offers_every_mode():
    choices = _mode_choices(build_parser())
    assert {"train --teacher-mode", "bench --modes"} <= set(choices)
    for flag, values in choices.items():
        assert sorted(values) == sorted(TeacherMode.values()), flag
        assert all(type(v) is str for v in values), flag  # bench records and help print them as given


def test_the_bench_runs_every_mode_hybrid_before_cache():
    from benchmarks.suite.config import MODES

    assert sorted(MODES) == sorted(TeacherMode.values()) and all(type(m) is str for m in MODES)
    assert MODES.index("hybrid") < MODES.index("cache")  # cache reads what the cold hybrid run filled
