"""The end-to-end demo: shards → teacher → Serve pool → distilled student vs no-teacher student.

The data is scikit-learn's bundled digits (the default) or an IDX data set of
`student_trainer.data.idx` (Fashion-MNIST's photographs from Debian's dataset-fashion-mnist), each
with the budget in `DEMO_DATA`. Everything runs on one embedded local Ray cluster (or `--address`).
The teacher is trained once and reused from `<workdir>/teacher` on later runs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from student_trainer.config import (
    DEFAULT_DISTILL_LOSSES,
    DataConfig,
    ModelConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.factory import check_model_config, resolve_model
from teacher_service.atomic_files import atomic_path, write_atomic

STUDENT = "digits-student"
TEACHER = "digits-teacher"


def check_models() -> None:
    """The demo's teacher and student, checked as `kd train` checks a student (both are trained as
    one), so a broken preset fails before Ray starts, not in the first run's workers."""
    for model in (TEACHER, STUDENT):
        check_model_config(ModelConfig(name=model))


@dataclass(frozen=True)
class DemoData:
    """A data set the demo runs on, and the budget that keeps the whole demo near its time on 2 cores."""

    teacher_epochs: int
    student_epochs: int
    train_limit: Optional[int] = None  # IDX data: training images drawn stratified by class (None: all)
    val_limit: Optional[int] = None  # the same for the val (test) split the table is measured on
    idx: bool = False  # an IDX data set (`student_trainer.data.idx.PRESETS`), else the bundled digits


# digits: all 1 437 training images. fashion-mnist: the same teacher and student on a stratified tenth
# of the 60 000 training photographs, sized for about 15 minutes on 2 cores: 60 000 teacher samples at
# the Fashion-MNIST teacher's ~165 samples/s (~6 min) and 36 000 per student at ~300-440 (~2 min
# each), plus startup, serving and evaluation on 2 000 test photographs (stratified; ~1 point of
# standard error near 80 %). A timing probe under load measured 100 samples/s for the teacher.
DEMO_DATA: dict[str, DemoData] = {
    "digits": DemoData(teacher_epochs=30, student_epochs=10),
    "fashion-mnist": DemoData(teacher_epochs=10, student_epochs=6, train_limit=6000, val_limit=2000, idx=True),
}


@dataclass
class DemoConfig:
    workdir: str = "kd-demo"
    quick: bool = False  # tiny budget: a smoke test of the whole path
    data: str = "digits"  # a key of DEMO_DATA
    data_dir: Optional[str] = None  # IDX data: the folder of its files, else the Debian package's
    teacher_epochs: Optional[int] = None  # None: the data set's (DEMO_DATA)
    student_epochs: Optional[int] = None
    train_limit: Optional[int] = None  # IDX data: None is the data set's (DEMO_DATA)
    val_limit: Optional[int] = None
    address: Optional[str] = None
    verbose: bool = False  # Ray's INFO logs, per-step lines and Serve's access log on the console
    seed: int = 0
    workers: int = 2
    batch_size: int = 64
    app_name: str = "kd-demo-teacher"
    distill_losses: dict = field(default_factory=lambda: dict(DEFAULT_DISTILL_LOSSES))
    # teachers > 1: more teachers of the same architecture from seeds seed+1, ... (each its own app,
    # `<app_name>-2`, ...), and one more student distilled from all of them at once (an ensemble)
    teachers: int = 1

    def app(self, index: int) -> str:
        """Teacher `index`'s Serve app (the first keeps `app_name`)."""
        return self.app_name if index == 0 else f"{self.app_name}-{index + 1}"

    def dataset(self) -> DemoData:
        """The data set's budget; ValueError naming the known ones, or the options it does not take."""
        if self.data not in DEMO_DATA:
            raise ValueError(f"unknown demo data {self.data!r}; known: {', '.join(DEMO_DATA)}")
        data = DEMO_DATA[self.data]
        given = [f for f in ("data_dir", "train_limit", "val_limit") if getattr(self, f) is not None]
        if given and not data.idx:
            raise ValueError(f"{', '.join(given)} apply to IDX data (--data fashion-mnist); "
                             f"the {self.data} come with scikit-learn, in one size")
        for name in ("train_limit", "val_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number of images, got {getattr(self, name)}")
        return data

    def epochs(self) -> tuple[int, int]:
        data = self.dataset()
        teacher = self.teacher_epochs or (1 if self.quick else data.teacher_epochs)
        student = self.student_epochs or (1 if self.quick else data.student_epochs)
        return teacher, student

    def limits(self) -> dict[str, Optional[int]]:
        """IDX data: how many images of each split the demo writes (None: all)."""
        data = self.dataset()
        return {"train": data.train_limit if self.train_limit is None else self.train_limit,
                "val": data.val_limit if self.val_limit is None else self.val_limit}

    def shards_dir(self) -> Path:
        """Where the demo writes its shards: `data/` for the digits (as always), `data-<name>/` else,
        so one workdir holds both and neither is reused for the other."""
        return Path(self.workdir) / ("data" if self.data == "digits" else f"data-{self.data}")


def _say(msg: str) -> None:
    print(f"[kd demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run_cfg(cfg: DemoConfig, name: str, model: str, epochs: int, teacher: TeacherSourceConfig,
             losses: dict) -> TrainConfig:
    data_dir = cfg.shards_dir()
    return TrainConfig(
        run_name=name, storage_path=str(Path(cfg.workdir) / "runs"),
        model=ModelConfig(name=model),
        data=DataConfig(train_shards=str(data_dir / "train-*.tar"), val_shards=str(data_dir / "val-*.tar"),
                        image_size=32, batch_size=cfg.batch_size),
        teacher=teacher, losses=losses, epochs=epochs, num_workers=cfg.workers, seed=cfg.seed,
        max_steps_per_epoch=2 if cfg.quick else None, log_every_steps=0 if cfg.quick else 10,
    ).validate()


def _train(train_cfg: TrainConfig, out_dir: Path, verbose: bool = False) -> dict:
    """Train, copy the final student checkpoint to `out_dir`, return its last metrics + wall time
    (and where the run's TensorBoard event files are, for its evaluation to join them)."""
    from student_trainer.events import tensorboard_dir
    from student_trainer.train import run_training

    start = time.perf_counter()
    result = run_training(train_cfg, verbose=verbose)
    wall = time.perf_counter() - start
    metrics = dict(result.metrics or {})
    metrics["wall_time_s"] = round(wall, 1)
    metrics["tensorboard"] = tensorboard_dir(train_cfg.with_absolute_paths().storage_path, train_cfg.run_name)
    metrics["run_dir"] = str(Path(train_cfg.with_absolute_paths().storage_path) / train_cfg.run_name)
    with atomic_path(out_dir, replace_dir=True) as tmp, result.checkpoint.as_directory() as d:
        shutil.copytree(d, tmp)  # the folder appears whole, its metrics with it, or the old one stays
        (tmp / "run_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def locate_data(cfg: DemoConfig) -> dict | None:
    """The IDX files the demo reads (None for the digits), found on the driver before Ray starts:
    a missing Debian package or folder fails here with `kd data idx`'s error (the apt line)."""
    if not cfg.dataset().idx:
        return None
    from student_trainer.data.idx import find_idx_files, preset_for

    preset = preset_for(cfg.data)
    return find_idx_files(cfg.data_dir or preset.default_dir, preset, dir_flag="--data-dir", file_flags=None)


def _written_from(data_dir: Path, cfg: DemoConfig, files: dict) -> bool:
    """Whether the IDX shards in ``data_dir`` were written from ``files`` with this seed and these limits."""
    from teacher_service.shards import load_dataset_info

    if not (data_dir / "dataset.json").exists():
        return False
    source = load_dataset_info(data_dir).get("source")
    if not isinstance(source, dict) or (source.get("dataset"), source.get("seed")) != (cfg.data, cfg.seed):
        return False
    recorded = source.get("splits", {})
    return set(recorded) == set(files) and all(
        (recorded[s].get("images"), recorded[s].get("limit")) == (str(files[s].images), cfg.limits()[s]) for s in files)


def ensure_data(cfg: DemoConfig, files: dict | None) -> Path:
    """The demo's train/val shards (`cfg.shards_dir()`), written or reused: the digits, or the IDX
    ``files`` (`locate_data`) through `kd data idx`'s writer with the data set's subset sizes."""
    from student_trainer.data.idx import write_idx_shards
    from student_trainer.data.write_shards import write_digits_shards

    data_dir, what = cfg.shards_dir(), "digit" if files is None else cfg.data
    reuse = (data_dir / "dataset.json").exists() if files is None else _written_from(data_dir, cfg, files)
    if reuse:
        _say(f"reusing {what} shards in {data_dir}")
        return data_dir
    if files is None:
        summaries = write_digits_shards(data_dir, seed=cfg.seed, image_size=32)
    else:  # at the files' own 28 px: the loader's views are 32 px, as in the Fashion-MNIST benchmarks
        summaries = write_idx_shards(data_dir, files, dataset=cfg.data, limits=cfg.limits(), seed=cfg.seed)
    _say(f"wrote {what} shards: " + ", ".join(f"{k} {v.samples}" for k, v in summaries.items()))
    return data_dir


def data_summary(cfg: DemoConfig, data_dir: Path) -> dict:
    """What the report says of the data: its name, where its shards are, and each split's size."""
    from teacher_service.shards import load_dataset_info

    splits = load_dataset_info(data_dir)["splits"]
    return {"name": cfg.data, "shards": str(data_dir), **{f"{s}_samples": splits[s]["samples"] for s in ("train", "val")}}


TEACHER_STAMP = "demo_teacher.json"


def teacher_identity(cfg: DemoConfig, data_dir: Path, epochs: int) -> dict:
    """What a demo teacher was made from: architecture, the data it saw (its dataset.json), seed,
    epochs. A teacher in the workdir is reused only when all of these match."""
    arch, overrides = resolve_model(ModelConfig(name=TEACHER))
    info = (data_dir / "dataset.json").read_bytes()
    return {"architecture": arch, "overrides": overrides, "seed": cfg.seed, "epochs": epochs,
            "data": hashlib.sha256(info).hexdigest()[:16]}


def reusable_teacher(teacher_dir: Path, identity: dict) -> str | None:
    """Why the teacher in ``teacher_dir`` cannot be reused (None: it can)."""
    stamp = teacher_dir / TEACHER_STAMP
    if not (teacher_dir / "model.pt").exists() or not (teacher_dir / "run_metrics.json").exists():
        return "none trained yet"
    if not stamp.exists():
        return f"{teacher_dir} records no {TEACHER_STAMP} (what it was trained from)"
    recorded = json.loads(stamp.read_text())
    differs = sorted(k for k in identity if recorded.get(k) != identity[k])
    return f"it was trained with other {', '.join(differs)}" if differs else None


def _ensure_teacher(cfg: DemoConfig, stamp: str, epochs: int, data_dir: Path, index: int = 0) -> tuple[Path, dict]:
    """Teacher `index` (seed cfg.seed + index, in `teacher/` or `teacher-<index+1>/`), trained or reused."""
    suffix = f"-{index + 1}" if index else ""
    cfg = replace(cfg, seed=cfg.seed + index)
    teacher_dir = Path(cfg.workdir) / f"teacher{suffix}"
    identity = teacher_identity(cfg, data_dir, epochs)
    why_not = reusable_teacher(teacher_dir, identity)
    if why_not is None:
        _say(f"reusing the teacher in {teacher_dir} (same architecture, data, seed and epochs)")
        return teacher_dir, json.loads((teacher_dir / "run_metrics.json").read_text())
    _say(f"training a {TEACHER} CLIP teacher for {epochs} epochs on the train split ({why_not})")
    run = _run_cfg(cfg, f"demo-teacher-{stamp}{suffix}", TEACHER, epochs, TeacherSourceConfig(mode="none"),
                   {"clip": 1.0})
    metrics = _train(run, teacher_dir, cfg.verbose)
    write_atomic(teacher_dir / TEACHER_STAMP, json.dumps(identity, indent=2))
    return teacher_dir, metrics


def _teacher_config(cfg: DemoConfig, teacher_dir: Path, index: int = 0):
    from teacher_service.config import ServingConfig, TeacherConfig

    arch, overrides = resolve_model(ModelConfig(name=TEACHER))
    serving = ServingConfig(app_name=cfg.app(index), num_cpus=1.0 if cfg.teachers == 1 else 0.5, max_batch_size=256)
    return TeacherConfig(model=arch, overrides=overrides, pretrained=str(teacher_dir / "model.pt"),
                         torch_threads=1, serving=serving)


def _distill(cfg: DemoConfig, stamp: str, epochs: int, workdir: Path) -> dict[str, dict]:
    """The students distilled from the served teachers: from the first (`student_distilled`) and,
    with several, from all of them at once (`student_ensemble`); name → last metrics."""
    _say(f"distilling {STUDENT} from the served teacher ({cfg.workers} DDP workers, "
         f"{epochs} epochs, losses {cfg.distill_losses})")
    runs = {"student_distilled": TeacherSourceConfig(mode="remote", app_name=cfg.app_name)}
    if cfg.teachers > 1:
        apps = [cfg.app(i) for i in range(cfg.teachers)]
        runs["student_ensemble"] = TeacherSourceConfig(mode="remote", sources=[{"name": a, "app_name": a} for a in apps])
    metrics = {}
    for name, teacher in runs.items():
        if name == "student_ensemble":
            _say(f"distilling {STUDENT} from all {cfg.teachers} teachers at once (their averaged distributions)")
        label = "distill" if name == "student_distilled" else "ensemble"
        run = _run_cfg(cfg, f"demo-{label}-{stamp}", STUDENT, epochs, teacher, dict(cfg.distill_losses))
        metrics[name] = _train(run, workdir / name, cfg.verbose)
    return metrics


def _row(name: str, metrics: dict, evaluation: dict, params: int) -> dict:
    return {
        "model": name, "zero_shot_top1": evaluation["zero_shot_top1"],
        "zero_shot_top5": evaluation["zero_shot_top5"], "i2t_r1": evaluation["i2t_r1"],
        "t2i_r1": evaluation["t2i_r1"], "params": params,
        "train_samples_per_s": metrics.get("run_samples_per_s"),
        "wall_time_s": metrics.get("wall_time_s"),
    }


def format_table(rows: list[dict]) -> str:
    cols = ["model", "zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1", "params",
            "train_samples_per_s", "wall_time_s"]
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) and v <= 1.0 else (f"{v:.1f}" if isinstance(v, float) else str(v))
    body = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _log_eval(metrics: dict, evaluation: dict) -> None:
    """Add an evaluation to the TensorBoard files of the run it evaluates, at the run's last step
    (a teacher reused from an older demo run is evaluated where that run's files are)."""
    from student_trainer.events import log_eval

    if metrics.get("tensorboard") and "step" in metrics:
        log_eval(metrics["tensorboard"], int(metrics["step"]), evaluation)


def _serve_and_distill(cfg: DemoConfig, teacher_cfgs: list, stamp: str, epochs: int,
                       workdir: Path) -> tuple[list[dict], dict[str, dict]]:
    """Serve each teacher as its own app, distil the students from them (`_distill`), and delete
    the apps, also when something failed; the teachers' infos and the students' last metrics."""
    from ray import serve

    from teacher_service.app import deploy

    infos = []
    try:
        for teacher_cfg in teacher_cfgs:
            _say(f"deploying the teacher as Serve app {teacher_cfg.serving.app_name!r}")
            infos.append(deploy(teacher_cfg, access_log=cfg.verbose).info.remote().result(timeout_s=300))
            _say(f"teacher fingerprint {infos[-1]['fingerprint']}, embed_dim {infos[-1]['embed_dim']}")
        distilled = _distill(cfg, stamp, epochs, workdir)
    finally:
        for teacher_cfg in teacher_cfgs:
            serve.delete(teacher_cfg.serving.app_name)
    return infos, distilled


def _baseline(cfg: DemoConfig, stamp: str, epochs: int, workdir: Path) -> dict:
    """The same student trained without a teacher on the same budget; its last metrics."""
    _say(f"training the same {STUDENT} without a teacher, same budget")
    run = _run_cfg(cfg, f"demo-baseline-{stamp}", STUDENT, epochs, TeacherSourceConfig(mode="none"), {"clip": 1.0})
    return _train(run, workdir / "student_baseline", cfg.verbose)


def _evaluate(teacher_cfgs: list, trained: list[tuple[Path, dict]], students: dict[str, dict], workdir: Path,
              val: str) -> list[dict]:
    """The table's rows: each teacher (as served) and each student checkpoint on the val split, each
    evaluation also added to the TensorBoard files of the run it evaluates."""
    from student_trainer.evaluate import evaluate_checkpoint, evaluate_teacher

    _say("evaluating teacher, distilled student and baseline on the val split")
    rows = []
    for i, (teacher_cfg, (_, teacher_metrics)) in enumerate(zip(teacher_cfgs, trained)):
        teacher_eval = evaluate_teacher(teacher_cfg, val)
        rows.append(_row("teacher" if i == 0 else f"teacher_{i + 1}", teacher_metrics, teacher_eval,
                         teacher_eval.pop("params")))
        _log_eval(teacher_metrics, teacher_eval)
    for name, metrics in students.items():
        evaluation = evaluate_checkpoint(workdir / name, val)
        rows.append(_row(name, metrics, evaluation, evaluation.pop("params")))
        _log_eval(metrics, evaluation)
    return rows


GAIN_METRICS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1")


def _gain(models: dict, student: str) -> dict:
    """What `student` gains over the no-teacher baseline, per metric."""
    return {m: round(models[student][m] - models["student_baseline"][m], 4) for m in GAIN_METRICS}


def _demo_report(cfg: DemoConfig, rows: list[dict], infos: list[dict], epochs: tuple[int, int],
                 started: float, data: dict) -> dict:
    """The demo's report.json: the data set, every model's row, the students' gains over the baseline,
    the teachers' fingerprints and the budget."""
    models = {r["model"]: {k: v for k, v in r.items() if k != "model"} for r in rows}
    report = {"data": data, "models": models, "baseline": "student_baseline",
              "gain_over_baseline": _gain(models, "student_distilled"), "teacher_fingerprint": infos[0]["fingerprint"]}
    if cfg.teachers > 1:
        report["teacher_fingerprints"] = [i["fingerprint"] for i in infos]
        report["ensemble_gain_over_baseline"] = _gain(models, "student_ensemble")
    return {**report, "distill_losses": cfg.distill_losses, "epochs": {"teacher": epochs[0], "student": epochs[1]},
            "workers": cfg.workers, "batch_size_per_worker": cfg.batch_size,
            "demo_wall_time_s": round(time.perf_counter() - started, 1)}


def _say_outcome(cfg: DemoConfig, report: dict, workdir: Path) -> None:
    """The closing lines: distilled vs baseline (and the ensemble's, with several teachers)."""
    d, b = report["models"]["student_distilled"], report["models"]["student_baseline"]
    _say(f"distilled vs baseline zero-shot top-1: {d['zero_shot_top1']:.4f} vs {b['zero_shot_top1']:.4f} "
         f"({report['gain_over_baseline']['zero_shot_top1']:+.4f}); "
         f"report written to {workdir / 'report.json'} ({report['demo_wall_time_s']:.0f}s)")
    if cfg.teachers > 1:
        e = report["models"]["student_ensemble"]
        _say(f"ensemble of {cfg.teachers} vs one teacher vs baseline zero-shot top-1: {e['zero_shot_top1']:.4f} vs "
             f"{d['zero_shot_top1']:.4f} vs {b['zero_shot_top1']:.4f}")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the report (also written to `<workdir>/report.json`): the data's
    shards, the teachers (trained or reused) served as Serve apps, the students distilled from them,
    the no-teacher baseline, every model evaluated on the val split, and the runs' curves drawn.
    The data set and its files are checked first, before the workdir is made and Ray starts."""
    from student_trainer.export import export_checkpoint
    from teacher_service.shards import resolve_shards

    from cluster.local import init_ray
    from cluster.report import write_report

    demo_start = time.perf_counter()
    teacher_epochs, student_epochs = cfg.epochs()
    files = locate_data(cfg)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    _say(init_ray(cfg.address, quiet=False, verbose=cfg.verbose))

    data_dir = ensure_data(cfg, files)
    val = str(data_dir / "val-*.tar")
    resolve_shards(val)
    trained = [_ensure_teacher(cfg, stamp, teacher_epochs, data_dir, i) for i in range(cfg.teachers)]
    teacher_cfgs = [_teacher_config(cfg, d, i) for i, (d, _) in enumerate(trained)]
    infos, distilled = _serve_and_distill(cfg, teacher_cfgs, stamp, student_epochs, workdir)
    students = {**distilled, "student_baseline": _baseline(cfg, stamp, student_epochs, workdir)}

    rows = _evaluate(teacher_cfgs, trained, students, workdir, val)
    exported = [export_checkpoint(workdir / n, workdir / "export" / n, force=True) for n in students]
    _say(f"students exported for open_clip alone (create_model_and_transforms('local-dir:DIR')): {', '.join(map(str, exported))}")
    data = data_summary(cfg, data_dir)
    report = _demo_report(cfg, rows, infos, (teacher_epochs, student_epochs), demo_start, data)
    write_atomic(workdir / "report.json", json.dumps(report, indent=2))
    report = write_report([Path(m["run_dir"]) for m in students.values()], workdir)  # PNGs
    print(f"\n{data['name']}: {data['train_samples']} training images, evaluated on {data['val_samples']} "
          f"val images\n" + format_table(rows) + "\n", flush=True)
    _say_outcome(cfg, report, workdir)
    return report
