"""Distillation methods compared under one budget: the same student, data, epochs, batch and seeds.

Trains the `digits-student` preset on the digits train split with: no teacher (CLIP loss only),
each method alone added to the CLIP task loss (kl, crd, fd, mfd, icl, gd, afd, embed_kd), CLIP-KD's
combination (clip + crd + icl + fd), clip + icl + kl, and optionally SigLIP as the task loss.
The runs go out `--concurrent` at a time as separate `kd train` processes on one shared teacher
pool (`cluster.sweep.run_sweep`, what `kd sweep` runs), the runs of one seed together, so the
pool coalesces the views they share; the report gives its computed/answered ratio.

Weights come in two steps, to fit a 2-core machine: a calibration run over a grid of factors of
each method's default weight (`student_trainer.losses.DEFAULT_WEIGHTS`) on a few seeds writes the
best factor per method (`--grid 0.25 1 4 --choose cal.json`); the report run uses them on more
seeds (`--weights-from cal.json`). Each student is evaluated on the val split (zero-shot top-1 and
top-5, retrieval R@1 both ways): mean and 95 % Student-t interval over seeds, and the gain over the
no-teacher run paired by seed. Table: `--out` (.md, .json beside it, rewritten atomically after
each group), bar chart: the same name with .png.

The teacher is a trained student-format checkpoint (model.pt + model_config.json, e.g. the
demo's `<workdir>/teacher`), deployed once as a Serve app that every run shares.

    python benchmarks/methods.py --teacher-dir /tmp/kd-demo-full/teacher --epochs 10 --seeds 0 1 \
        --grid 0.25 1 4 --choose benchmarks/results/methods_weights.json \
        --out benchmarks/results/methods_calibration.md
    python benchmarks/methods.py --teacher-dir /tmp/kd-demo-full/teacher --epochs 10 --seeds 0 1 2 3 4 \
        --weights-from benchmarks/results/methods_weights.json --out benchmarks/results/methods.md

Teacher-scored data selection (issue 30, `--selection SCORE:K ...`): the default recipe
(`DEFAULT_DISTILL_LOSSES`) without selection and with each SCORE at each K, every selection row
trained `--epochs` × K epochs (an epoch is one pass in super-batches of K × batch), so every row
takes the same optimizer steps (up to an epoch's last partial super-batch: the table shows them).
The report adds what each selection row drew, trained on and paid (teacher-seconds with the pool's
scoring, the student's scoring seconds, answer bytes) and its gain over the default recipe paired
by seed; with `--eval-every` each row's time to the no-teacher final (teacher-seconds include the
pool's scoring). `--answer-dtypes int8 bf16` adds the default recipe trained from the pool's
answers in those dtypes, paired by seed with fp16 (issue 29 item 5).

The Fashion-MNIST report (`benchmarks/results/fashion_mnist.md`) took its selection and answer-dtype
rows from the runs of its first ten rows (`--reuse-from`: same budget, teacher and data) plus:

    ROWS=('no teacher (clip)' 'clip + icl' 'CLIP-KD (clip+crd+icl+fd)' 'clip + fd' 'clip + afd' \
          'clip + embed_kd' 'clip + kl' 'pure distillation (kl)' 'clip + icl (teachers 1 + 2)' \
          'clip + icl (init from teacher)')
    python benchmarks/methods.py --teacher-dir fashion-vit --second-teacher-dir fashion-rn \
        --data-dir fashion-mnist-12k --epochs 2 --seeds 0 1 2 3 4 --eval-every 47 --with-inherit \
        --weights-from benchmarks/results/methods_weights.json --only "${ROWS[@]}" \
        --selection uniform:2 teacher_loss:2 learnability:2 uniform:4 teacher_loss:4 learnability:4 \
        --answer-dtypes int8 bf16 --reuse-from benchmarks/results/fashion_mnist.json \
        --out benchmarks/results/fashion_mnist.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from student_trainer.checkpoint import load_model_config, read_provenance
from student_trainer.config import (
    DEFAULT_DISTILL_LOSSES,
    SELECTION_SCORES,
    DataConfig,
    ModelConfig,
    SelectionConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.factory import resolve_model
from student_trainer.intervals import interval
from student_trainer.losses import DEFAULT_WEIGHTS
from teacher_service.atomic_files import write_atomic
from teacher_service.config import ANSWER_DTYPES, ServingConfig, TeacherConfig

STUDENT = "digits-student"
APP = "kd-methods-bench-teacher"
SINGLE = ("kl", "crd", "fd", "mfd", "icl", "gd", "afd", "embed_kd")
CLIP_KD_PUBLISHED = ("fd", "mfd", "icl", "crd", "gd", "afd")  # ViT-B/16 → ViT-T/16, zero-shot IN top-1
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # open_clip's SigLIP init
INHERITED = " (init from teacher)"  # suffix of a row whose student starts from the teacher's weights
PURE = "pure distillation (kl)"  # no contrastive task loss: the student learns the teacher's similarities only


APP_2 = APP + "-2"
ENSEMBLE_METHOD = "icl"  # the recipe the ensemble rows compare: the benchmark's best single method


def ensemble_rows(chosen: Optional[dict[str, float]] = None) -> dict[str, dict]:
    """With a second teacher: the best recipe distilled from it alone and from both at once (each
    teacher its own pool and its own loss heads), beside the first teacher's `clip + icl` row."""
    weight = DEFAULT_WEIGHTS[ENSEMBLE_METHOD] * (chosen or {}).get(ENSEMBLE_METHOD, 1.0)
    losses = {"clip": 1.0, ENSEMBLE_METHOD: weight}
    return {f"clip + {ENSEMBLE_METHOD} (teacher 2)": {"losses": losses, "teacher": True, "overrides": {},
                                                     "apps": [APP_2], "inherit": False},
            f"clip + {ENSEMBLE_METHOD} (teachers 1 + 2)": {"losses": dict(losses), "teacher": True, "overrides": {},
                                                          "apps": [APP, APP_2], "inherit": False}}


DEFAULT_RECIPE = "default recipe"  # DEFAULT_DISTILL_LOSSES, the rows data selection is compared on


def selection_arg(text: str) -> tuple[str, int]:
    """`SCORE:K` of `--selection` (a SelectionConfig score, K >= 2)."""
    score, _, k = text.partition(":")
    if score not in SELECTION_SCORES or not k.isdigit() or int(k) < 2:
        raise argparse.ArgumentTypeError(f"--selection {text!r}: expected SCORE:K with SCORE one of "
                                         f"{SELECTION_SCORES} and K >= 2, e.g. teacher_loss:4")
    return score, int(k)


def _default_recipe() -> dict:
    return {"losses": dict(DEFAULT_DISTILL_LOSSES), "teacher": True, "overrides": {}, "inherit": False}


def selection_rows(picks: list[tuple[str, int]]) -> dict[str, dict]:
    """The default recipe without data selection, then with each (score, k) of `picks`."""
    rows = {DEFAULT_RECIPE: _default_recipe()}
    for score, k in picks:
        rows[f"{DEFAULT_RECIPE}, select {score} k={k}"] = {**_default_recipe(), "selection": {"score": score, "k": k}}
    return rows


def answer_dtype_rows(dtypes: list[str]) -> dict[str, dict]:
    """The default recipe with fp16 answers (the pool's default), then with each of `dtypes`
    (issue 29 item 5: what a student loses when its teacher's embeddings come compressed)."""
    rows = {DEFAULT_RECIPE: _default_recipe()}
    rows.update({f"{DEFAULT_RECIPE}, {d} answers": {**_default_recipe(), "answer_dtype": d} for d in dtypes})
    return rows


def _factor_name(name: str, factor: float) -> str:
    return name if factor == 1 else f"{name} ×{factor:g}"


def methods_to_run(with_siglip: bool, only: Optional[list[str]] = None, with_inherit: bool = False,
                   grid: tuple[float, ...] = (1.0,), chosen: Optional[dict[str, float]] = None) -> dict[str, dict]:
    """Row name → {"losses": weights, "teacher": bool, "overrides": model overrides, "inherit": bool}.

    Each single method runs at its default weight times every factor of `grid` (rows
    `clip + fd ×0.25`, ...), or at the factor `chosen` for it by a calibration run (rows `clip + fd`);
    CLIP-KD's combination takes its members' chosen factors. With `with_inherit` each row is
    followed by its twin that starts from the teacher's weights. `only` then keeps the rows it
    names (a twin by its own name, `<row> (init from teacher)`)."""
    chosen = chosen or {}
    rows = {"no teacher (clip)": {"losses": {"clip": 1.0}, "teacher": False, "overrides": {}}}
    if with_siglip:
        rows["no teacher (siglip)"] = {"losses": {"siglip": 1.0}, "teacher": False, "overrides": SIGLIP_INIT}
    for name in SINGLE:
        factors = (chosen[name],) if name in chosen else grid
        for factor in factors:
            row = f"clip + {name}" if name in chosen else _factor_name(f"clip + {name}", factor)
            rows[row] = {"losses": {"clip": 1.0, name: DEFAULT_WEIGHTS[name] * factor}, "teacher": True,
                         "overrides": {}, "method": name, "factor": factor}
    rows["clip + icl + kl"] = {"losses": {"clip": 1.0, "icl": DEFAULT_WEIGHTS["icl"] * chosen.get("icl", 1.0),
                                          "kl": DEFAULT_WEIGHTS["kl"] * chosen.get("kl", 1.0)},
                               "teacher": True, "overrides": {}}
    rows[PURE] = {"losses": {"kl": DEFAULT_WEIGHTS["kl"] * chosen.get("kl", 1.0)}, "teacher": True, "overrides": {}}
    rows["CLIP-KD (clip+crd+icl+fd)"] = {
        "losses": {"clip": 1.0, **{m: DEFAULT_WEIGHTS[m] * chosen.get(m, 1.0) for m in ("crd", "icl", "fd")}},
        "teacher": True, "overrides": {}}
    rows = {k: {**v, "inherit": False} for k, v in rows.items()}
    if with_inherit:
        rows = {n: s for name, spec in rows.items()
                for n, s in ((name, spec), (name + INHERITED, {**spec, "inherit": True}))}
    if only:
        unknown = sorted(set(only) - set(rows))
        if unknown:
            raise SystemExit(f"unknown --only rows {unknown}; known: {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in only}
    return rows


def choose_factors(report: dict) -> dict[str, dict]:
    """Per method, the grid factor with the highest mean zero-shot top-1 over the seeds run (ties:
    the factor nearest the authors' weight, 1), with every factor's mean for the record."""
    by_method: dict[str, dict[float, float]] = {}
    for name, spec in report["methods"].items():
        s = report["summary"].get(name, {})
        if spec.get("method") and s.get("runs"):
            by_method.setdefault(spec["method"], {})[spec["factor"]] = s["zero_shot_top1"]
    return {m: {"factor": max(scores, key=lambda f: (scores[f], -abs(math.log(f)))),
                "mean_top1_by_factor": {f"{f:g}": round(v, 4) for f, v in sorted(scores.items())}}
            for m, scores in by_method.items()}


def teacher_config(teacher_dir: Path, app: str = APP) -> TeacherConfig:
    """As `cluster/demo.py::_teacher_config`: the checkpoint's architecture, weights from model.pt."""
    if not (teacher_dir / "model.pt").is_file():
        raise SystemExit(f"--teacher-dir {teacher_dir}: no model.pt (a student checkpoint dir is expected)")
    arch, overrides = resolve_model(load_model_config(teacher_dir))
    return TeacherConfig(model=arch, overrides=overrides, pretrained=str(teacher_dir / "model.pt"), torch_threads=1,
                         serving=ServingConfig(app_name=app, num_cpus=1.0, max_batch_size=256))


def model_facts(teacher_dir: Path, student: str = STUDENT) -> dict:
    """Widths and patch counts the notes under the table refer to."""
    from student_trainer.factory import create_student
    from student_trainer.masking import num_patches

    _, overrides = resolve_model(load_model_config(teacher_dir))
    return {"teacher_embed_dim": overrides.get("embed_dim"),
            "student_patches": num_patches(create_student(ModelConfig(name=student)))}


def data_name(data: Path) -> str:
    """The data set the shards came from (`dataset.json`'s source, e.g. fashion-mnist), else digits."""
    from teacher_service.shards import load_dataset_info

    try:
        source = load_dataset_info(data).get("source")
    except FileNotFoundError:  # digits written by an older `kd data digits`, or none yet
        return "digits"
    return source.get("dataset", "digits") if isinstance(source, dict) else "digits"


def find_data(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    beside = Path(args.teacher_dir).resolve().parent / "data"
    if (beside / "dataset.json").is_file():
        return beside
    from student_trainer.data.write_shards import write_digits_shards

    data = Path(args.workdir) / "data"
    if not (data / "dataset.json").is_file():
        write_digits_shards(data, seed=0, image_size=32)
    return data


def train_cfg(args, data: Path, name: str, spec: dict, seed: int, tcfg: TeacherConfig) -> TrainConfig:
    """A row's run; a selection row trains epochs × k epochs, so it takes the same optimizer steps."""
    mode = spec.get("mode", args.teacher_mode) if spec["teacher"] else "none"
    inherit = bool(spec.get("inherit"))  # the weights come from the teacher's config in every mode
    selection = SelectionConfig(**spec.get("selection", {}))
    return TrainConfig(
        run_name=f"methods-{_slug(name)}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str(Path(args.workdir) / "runs"),
        model=ModelConfig(name=args.student, overrides=dict(spec["overrides"]), init_from_teacher=inherit),
        data=DataConfig(train_shards=str(data / "train-*.tar"), val_shards=str(data / "val-*.tar"),
                        image_size=32, batch_size=args.batch_size),
        teacher=_teacher_source(spec, mode, tcfg, inherit, spec.get("answer_dtype")), selection=selection,
        losses=dict(spec["losses"]), epochs=args.epochs * selection.k, num_workers=args.workers, seed=seed,
        log_every_steps=0, torch_threads=1, eval_every_steps=args.eval_every,
    ).validate()


def _teacher_source(spec: dict, mode: str, tcfg: TeacherConfig, inherit: bool,
                    answer_dtype: Optional[str] = None) -> TeacherSourceConfig:
    apps = spec.get("apps") or [APP]
    if len(apps) > 1:  # an ensemble: one source per pool, the losses average over them
        return TeacherSourceConfig(mode=mode, sources=[{"name": a, "app_name": a} for a in apps],
                                   answer_dtype=answer_dtype)
    return TeacherSourceConfig(mode=mode, app_name=apps[0], teacher=tcfg if mode == "inline" or inherit else None,
                               cache_path=spec.get("cache_path"), answer_dtype=answer_dtype)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


REUSE_META = ("epochs", "batch_size", "workers", "teacher_mode", "teacher_fingerprint", "data_dir", "student",
              "eval_every")


REUSE_DEFAULTS = {"student": STUDENT, "eval_every": 0}  # what a report made before these fields were recorded ran


def reusable_runs(files: list[str], meta: dict, methods: dict[str, dict]) -> dict[tuple[str, int], dict]:
    """(row, seed) → a finished run of an earlier report made under the same budget, teacher and data
    (`REUSE_META`) with the same losses, student and pools (`_spec_key`, whatever the row was
    called), so a report at the calibrated weights need not repeat the calibration's runs. A report made otherwise is refused, naming the field."""
    found: dict[tuple[str, int], dict] = {}
    for file in files:
        old = json.loads(Path(file).read_text())
        for key in REUSE_META:
            if old["meta"].get(key, REUSE_DEFAULTS.get(key)) != meta.get(key, REUSE_DEFAULTS.get(key)):
                raise SystemExit(f"--reuse-from {file}: its {key} is {old['meta'].get(key)!r}, "
                                 f"this run's is {meta.get(key)!r}")
        second_same = ((old["meta"].get("second_teacher") or {}).get("fingerprint")
                       == (meta.get("second_teacher") or {}).get("fingerprint"))
        by_spec: dict[str, list[dict]] = {}
        for old_name, old_spec in old["methods"].items():
            by_spec.setdefault(_spec_key(old_spec), []).extend(old["runs"].get(old_name, []))
        for name, spec in methods.items():
            if APP_2 in (spec.get("apps") or []) and not second_same:
                continue
            for row in by_spec.get(_spec_key(spec), []):
                if "error" not in row:
                    found.setdefault((name, row["seed"]), {**row, "reused_from": file})
    return found


def _spec_key(spec: dict) -> str:
    """What decides a run besides its seed: losses, model overrides, inheritance, teacher pools
    (a calibration row `clip + fd ×0.25` is the report row `clip + fd` at factor 0.25)."""
    return json.dumps({"losses": spec.get("losses"), "overrides": spec.get("overrides") or {},
                       "inherit": bool(spec.get("inherit")), "apps": spec.get("apps") or None,
                       "teacher": bool(spec.get("teacher")), "selection": spec.get("selection"),
                       # fp16, the pool's default, keeps the key of every report made before answer dtypes
                       **({"answer_dtype": spec["answer_dtype"]} if spec.get("answer_dtype", "fp16") != "fp16"
                          else {})}, sort_keys=True)


def run_group(args, data: Path, items: list[tuple[str, dict, int]], tcfg: TeacherConfig,
              address: str) -> list[dict]:
    """Every (row, spec, seed) of `items` as its own `kd train` process, all at once on the shared
    teacher pool (`cluster.sweep.run_sweep`: what `kd sweep` runs), then each checkpoint evaluated
    here. A run that fails is recorded with its error; the others keep their results."""
    from cluster.sweep import run_sweep

    cfgs = [train_cfg(args, data, name, spec, seed, tcfg) for name, spec, seed in items]
    paths = []
    for cfg in cfgs:
        path = Path(args.workdir) / "configs" / f"{cfg.run_name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(path)
        paths.append(str(path))
    outcomes = run_sweep(paths, address)
    return [_evaluated(cfg, outcome, data, seed) for cfg, outcome, (_, _, seed) in zip(cfgs, outcomes, items)]


def _evaluated(cfg: TrainConfig, outcome, data: Path, seed: int) -> dict:
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.curves import CURVE_CLOCKS, read_curve
    from student_trainer.evaluate import evaluate_checkpoint

    checkpoint = latest_checkpoint(Path(cfg.storage_path) / cfg.run_name)
    if outcome.returncode != 0 or checkpoint is None:
        return {"seed": seed, "error": f"kd train exited {outcome.returncode} (run {cfg.run_name})"}
    ev = evaluate_checkpoint(checkpoint, str(data / "val-*.tar"))
    m = outcome.metrics or {}
    return {
        "seed": seed, "run_name": cfg.run_name, **{k: ev[k] for k in EVAL_KEYS}, "val_samples": ev["samples"],
        "samples_per_s": m.get("run_samples_per_s"), "peak_rss_mb": m.get("peak_rss_mb"),
        "wall_time_s": outcome.wall_time_s, "teacher_requests": m.get("teacher_requests"),
        "teacher_wait_s": m.get("teacher_wait_s"),
        **final_scales(checkpoint), "init": (read_provenance(checkpoint) or {}).get("init"),
        "final_losses": {k: v for k, v in m.items() if k.endswith("_loss")},
        "curve": [{k: p.get(k) for k in (*CURVE_CLOCKS, "zero_shot_top1")}
                  for p in read_curve(Path(cfg.storage_path) / cfg.run_name)],
        **{k: m[k] for k in RUN_FIGURES if k in m},
    }


def pool_counts(app: str) -> dict:
    """The pool's answered / computed / coalesced samples and forward seconds so far."""
    from teacher_service.app import collect_stats, get_teacher_handle

    stats = collect_stats(get_teacher_handle(app))
    return {k: stats.get(k, 0) for k in ("samples", "samples_requested", "samples_computed", "samples_coalesced",
                                         "samples_from_cache", "forward_s")}


def final_scales(checkpoint_dir: Path) -> dict:
    """The trained student's exponentiated logit scale (and SigLIP bias), for the notes."""
    import torch

    state = torch.load(checkpoint_dir / "model.pt", map_location="cpu", weights_only=True)
    out = {"logit_scale": round(float(state["logit_scale"].exp()), 4)}
    if state.get("logit_bias") is not None:
        out["logit_bias"] = round(float(state["logit_bias"]), 4)
    return out


# --------------------------------------------------------------------------- report
EVAL_KEYS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1")
# a run's own figures kept per row: its steps, samples and clocks, and what data selection cost
RUN_FIGURES = ("step", "samples_seen", "samples_trained", "train_wall_s", "teacher_s", "selection_teacher_s",
               "selection_student_s", "selection_bytes", "selection_score_drawn_mean", "selection_score_kept_mean")
METRICS = (*EVAL_KEYS, "samples_per_s", "peak_rss_mb")
BASELINE = "no teacher (clip)"


def summarise(runs: list[dict], baseline: Optional[list[dict]] = None) -> dict:
    """Mean, 95 % interval, min and max of every metric over seeds; with the baseline's runs, the
    gain over it paired by seed (same seed: same data order, views and initialisation)."""
    ok = [r for r in runs if "error" not in r]
    out = {"runs": len(ok), "seeds": [r["seed"] for r in ok], "errors": [r["error"] for r in runs if "error" in r]}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key], out[f"{key}_lo"], out[f"{key}_hi"] = interval(values)
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    base = {r["seed"]: r for r in (baseline or []) if "error" not in r}
    for key in EVAL_KEYS:
        gains = [r[key] - base[r["seed"]][key] for r in ok if r["seed"] in base and r.get(key) is not None]
        if gains:
            out[f"gain_{key}"], out[f"gain_{key}_lo"], out[f"gain_{key}_hi"] = interval(gains)
    return out


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _cell(s: dict, key: str, pct: bool, signed: bool = False) -> str:
    """`mean [lo, hi]` (95 % interval over seeds) in percent or units; just the mean for one seed."""
    if key not in s:
        return "—"
    fmt = (lambda v: f"{100 * v:{'+' if signed else ''}.1f}") if pct else (lambda v: f"{v:.0f}")
    if s["runs"] > 1 and s[f"{key}_lo"] != s[f"{key}_hi"]:
        lo, hi = s[key + "_lo"], s[key + "_hi"]
        if pct and not signed:  # a t-interval knows nothing of a metric's 0..1 range
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return f"{fmt(s[key])} [{fmt(lo)}, {fmt(hi)}]"
    return fmt(s[key])


def _load(runs: list[dict]) -> str:
    loads = [r["load_avg_1m"] for r in runs if r.get("load_avg_1m") is not None]
    return f"{statistics.median(loads):.1f}" if loads else "—"


def ranking_note(summary: dict[str, dict], base: Optional[float], data: str = "digits") -> list[str]:
    """Where our order of the six CLIP-KD methods differs from the published one."""
    ours = [(m, summary.get(f"clip + {m}", {}).get("zero_shot_top1")) for m in CLIP_KD_PUBLISHED]
    ours = [(m, v) for m, v in ours if v is not None]
    if len(ours) < 2:
        return []
    order = [m for m, _ in sorted(ours, key=lambda mv: -mv[1])]
    published = [m for m in CLIP_KD_PUBLISHED if m in order]
    lines = ["## Ranking vs CLIP-KD's published one", "",
             f"- CLIP-KD (ViT-B/16 → ViT-T/16, ImageNet zero-shot): {' > '.join(m.upper() for m in published)}",
             f"- here ({data} val zero-shot top-1): "
             + " > ".join(f"{m.upper()} {100 * v:.1f}" for m, v in sorted(ours, key=lambda mv: -mv[1]))]
    moved = [f"{m.upper()} {published.index(m) + 1}→{order.index(m) + 1}" for m in published
             if published.index(m) != order.index(m)]
    lines.append(f"- positions that differ (published→here): {', '.join(moved) if moved else 'none'}")
    if base is not None:
        beat = [f"{m.upper()} {100 * (v - base):+.1f}" for m, v in ours]
        lines.append(f"- vs the no-teacher baseline ({100 * base:.1f}), points: {', '.join(beat)}")
    return lines + [""]


def _final(report: dict, name: str, key: str) -> Optional[float]:
    values = [r["final_losses"].get(key) for r in report["runs"].get(name, []) if "final_losses" in r]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _row_median(report: dict, name: str, key: str) -> Optional[float]:
    values = [r[key] for r in report["runs"].get(name, []) if r.get(key) is not None]
    return statistics.median(values) if values else None


def reading_notes(report: dict, base: Optional[float]) -> list[str]:
    """Mechanical facts that explain parts of the table; each is only stated when the data shows it."""
    summary, meta, notes = report["summary"], report["meta"], []
    kl, crd = summary.get("clip + kl", {}), summary.get("clip + crd", {})
    if kl.get("runs") and all(kl.get(k) == crd.get(k) for k in ("zero_shot_top1", "i2t_r1", "t2i_r1")):
        notes.append("- KL and CRD train the same student: CRD = KL(σ_t‖σ_s) = CE(σ_t, σ_s) − H(σ_t), and the "
                     "teacher's entropy H(σ_t) is a constant for the student, so at temperature 1 the two "
                     "have identical gradients (their loss values differ by H(σ_t)).")
    gd, gd_clip = _final(report, "clip + gd", "gd_loss"), _final(report, "clip + gd", "clip_loss")
    scale = _row_median(report, "clip + gd", "logit_scale")
    if gd is not None and gd_clip and gd < 1e-2 * gd_clip:
        at = (f"; this student ends at s = {scale:.1f} (init 1/0.07 = 14.3), where their 1e8 would stand for "
              f"a weight of about {2e8 / (512 * scale ** 4):.2g} at D_t = 512" if scale else "")
        notes.append(f"- GD hardly acts at its default weight: its weighted loss ends at {gd:.1e} against the CLIP "
                     f"loss's {gd_clip:.2f}. The default, 1/256, is what CLIP-KD's 1e8 stands for at D_t = 512 and "
                     f"s = 100 (their gradients are s² too small, their MSE a mean over D and four direction terms: "
                     f"2e8/(D_t·s⁴); docs/design.md, Loss weights){at}. The paper's own GD was this weak.")
    fd, fd_clip = _final(report, "clip + fd", "fd_loss"), _final(report, "clip + fd", "clip_loss")
    fd_top1 = summary.get("clip + fd", {}).get("zero_shot_top1")
    dt = meta.get("teacher_embed_dim")
    if fd is not None and fd_clip and base is not None and fd_top1 is not None and fd_top1 < base:
        width = (f" MSE is a mean over the D_t = {dt} teacher dimensions, so at a fixed weight the pull per "
                 f"unit of cosine distance is {512 / dt:g}× the paper's (ViT-B/16 teacher, D_t = 512)."
                 if dt else "")
        notes.append(f"- FD at CLIP-KD's weight 2000 dominates the objective here: the weighted FD term ends at "
                     f"{fd:.1f}, {fd / fd_clip:.1f}× the CLIP term.{width}")
    mfd_top1 = summary.get("clip + mfd", {}).get("zero_shot_top1")
    patches = meta.get("student_patches")
    if mfd_top1 is not None and fd_top1 is not None and mfd_top1 < fd_top1 and patches:
        kept = max(1, round(patches * 0.25))
        notes.append(f"- MFD drops 75 % of the student's patches: {kept} of {patches} patches of a 32 px digit "
                     f"at patch size 8 remain (CLIP-KD's ViT-T/16 at 224 px keeps 49 of 196), and the "
                     f"masked view carries the same 2000 weight as FD.")
    notes += inherit_notes(report)
    sig = summary.get("no teacher (siglip)", {}).get("zero_shot_top1")
    sig_loss = _final(report, "no teacher (siglip)", "siglip_loss")
    n = meta["global_batch"]
    trivial = math.log(n) + (n - 1) * math.log(n / (n - 1))  # every pair at the same logit −log(n−1)
    if sig is not None and base is not None and sig < 0.5 * base and sig_loss is not None:
        collapsed = abs(sig_loss - trivial) < 0.01
        notes.append(
            f"- SigLIP as the task loss (open_clip's SigLIP init: scale 10, bias −10; no teacher) reached "
            f"{100 * sig:.1f} % zero-shot top-1, chance level for 10 classes. "
            + (f"Its loss ends at {sig_loss:.3f}, the value of the trivial solution that gives every "
               f"image–text pair the same logit −log({n}−1) (log N + (N−1)·log(N/(N−1)) = {trivial:.3f} for "
               f"N = {n} columns), where the bias gradient vanishes: the embeddings collapsed. On digits a "
               f"128 batch repeats each class about 13 times and each caption about twice, all counted as "
               f"negatives by the sigmoid loss." if collapsed else "")
            + " It is a task-loss variant, not a distillation method, and is left out of the ranking.")
    return notes


def inherit_notes(report: dict) -> list[str]:
    """Each row next to its twin that started from the teacher's weights: top-1 and final loss."""
    notes = []
    for name in report["summary"]:
        twin = report["summary"].get(name + INHERITED, {})
        base = report["summary"][name]
        if not (twin.get("runs") and base.get("runs")):
            continue
        loss, loss_twin = _final_total(report, name), _final_total(report, name + INHERITED)
        loss_text = (f"; final training loss {loss:.3f} → {loss_twin:.3f}"
                     if loss is not None and loss_twin is not None else "")
        notes.append(f"- {name}: starting from the teacher's weights moves zero-shot top-1 "
                     f"{100 * base['zero_shot_top1']:.1f} → {100 * twin['zero_shot_top1']:.1f} "
                     f"({100 * (twin['zero_shot_top1'] - base['zero_shot_top1']):+.1f} points; "
                     f"{_per_seed(report, name)}){loss_text}, at the same budget."
                     f"{_blocks_text(report['runs'][name + INHERITED])}")
    return notes


def _per_seed(report: dict, name: str) -> str:
    """'seed s: a → b' for every seed both rows ran: a median of few seeds hides their spread."""
    top1 = {twin: {r["seed"]: r["zero_shot_top1"] for r in report["runs"][twin] if "zero_shot_top1" in r}
            for twin in (name, name + INHERITED)}
    seeds = sorted(set(top1[name]) & set(top1[name + INHERITED]))
    return ", ".join(f"seed {s}: {100 * top1[name][s]:.1f} → {100 * top1[name + INHERITED][s]:.1f}" for s in seeds)


def _final_total(report: dict, name: str) -> Optional[float]:
    """Median over seeds of the last epoch's summed loss terms (what the optimizer minimised)."""
    totals = [sum(r["final_losses"].values()) for r in report["runs"].get(name, []) if r.get("final_losses")]
    return statistics.median(totals) if totals else None


def _blocks_text(runs: list[dict]) -> str:
    init = next((r["init"] for r in runs if (r.get("init") or {}).get("from") == "teacher"), None)
    if init is None:
        return ""
    taken = "; ".join(f"{stack}: blocks {blocks} of {init['teacher_depth'][stack]}"
                      for stack, blocks in init["blocks"].items())
    return (f" Inherited ({init['layers']}): {taken}; {init['tensors_sliced']} tensors sliced to the "
            f"student's widths, {init['tensors_copied']} copied whole.")


def render(report: dict) -> str:
    summary, meta = report["summary"], report["meta"]
    base = summary.get(BASELINE, {}).get("zero_shot_top1")
    seeds = meta["seeds"]
    lines = [
        f"# Distillation methods on {meta.get('data_name', 'digits')}, one budget",
        "",
        f"Generated by `benchmarks/methods.py` on {meta['date']}; command:",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {meta['machine']}. Student `{meta.get('student', STUDENT)}` ({meta['student_params']:,} parameters) trained "
        f"{meta['epochs']} epochs, batch {meta['batch_size']} × {meta['workers']} DDP workers "
        f"({meta['global_batch']} global), AdamW lr 1e-3 warmup 20 + cosine, seed(s) {seeds}; "
        f"teacher `{meta['teacher_model']}` from `{meta['teacher_dir']}` ({meta['teacher_mode']} mode, "
        f"fingerprint {meta.get('teacher_fingerprint', '?')}). Evaluation on the val split "
        f"({meta.get('val_samples', '?')} images, never trained on).",
        "",
        f"Teacher on the same val split: zero-shot top-1 {_pct(meta.get('teacher_eval', {}).get('zero_shot_top1'))}, "
        f"i2t R@1 {_pct(meta.get('teacher_eval', {}).get('i2t_r1'))}, "
        f"t2i R@1 {_pct(meta.get('teacher_eval', {}).get('t2i_r1'))}.",
        *([f"Second teacher (rows `(teacher 2)`, `(teachers 1 + 2)`: an ensemble of both pools, one "
           f"{ENSEMBLE_METHOD.upper()} head per teacher): `{meta['second_teacher']['model']}` with "
           f"`{meta['second_teacher']['overrides']}` from `{meta['second_teacher']['dir']}`, fingerprint "
           f"{meta['second_teacher']['fingerprint']}, zero-shot top-1 "
           f"{_pct(meta['second_teacher']['eval'].get('zero_shot_top1'))} on the same val split."]
          if meta.get("second_teacher") else []),
        "",
        "| run | losses (weights) | zero-shot top-1 % | gain vs no teacher, paired (points) | top-5 % | "
        "i2t R@1 % | t2i R@1 % | gain in i2t R@1 | samples/s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        losses = ", ".join(f"{k} {v:g}" for k, v in report["methods"][name]["losses"].items())
        if s["runs"] == 0:
            status = f"failed: {s['errors'][0][:80]}" if s["errors"] else "not run yet"
            lines.append(f"| {name} | {losses} | {status} | | | | | | | |")
            continue
        lines.append(f"| {name} | {losses} | {_cell(s, 'zero_shot_top1', True)} | "
                     f"{_cell(s, 'gain_zero_shot_top1', True, signed=True) if name != BASELINE else ''} | "
                     f"{_cell(s, 'zero_shot_top5', True)} | {_cell(s, 'i2t_r1', True)} | {_cell(s, 't2i_r1', True)} | "
                     f"{_cell(s, 'gain_i2t_r1', True, signed=True) if name != BASELINE else ''} | "
                     f"{_cell(s, 'samples_per_s', False)} | {s['runs']} |")
    n = meta.get("val_samples") or 0
    se = 100 * math.sqrt(base * (1 - base) / n) if base is not None and n else None
    lines += ["", "## How much to trust this", ""]
    if len(seeds) == 1:
        lines.append("- One seed per run: the seed-to-seed spread is not measured here, so the table "
                     "gives single values.")
    else:
        lines.append(f"- Mean over seeds {seeds} with its 95 % Student-t interval in brackets (cut to "
                     f"0–100 %). The gain "
                     f"columns pair each run with the no-teacher run of the same seed (same data order, "
                     f"views and initialisation) and give the mean difference and its interval: an "
                     f"interval that excludes 0 is a gain (or loss) the seeds agree on.")
    if se is not None:
        lines.append(f"- Evaluation noise alone: with {n} val images the standard error of a top-1 near "
                     f"{100 * base:.0f} % is about {se:.1f} points, so differences under ~{2 * se:.0f} points "
                     f"are not distinguishable, before counting seed-to-seed training variance.")
    loads = meta.get("load_avg_1m_runs") or []
    load_text = (f" (the `load` column: 1-minute load average when the run ended, "
                 f"{min(loads):.1f}–{max(loads):.1f})" if loads else "")
    lines.append(f"- samples/s is the whole run's training throughput (all workers) on a shared "
                 f"{meta['machine'].split(' ')[0]} machine: other jobs ran at the same time{load_text}, so "
                 f"it is indicative only. Peak RSS is the rank-0 student worker's (mostly the Ray/torch "
                 f"process baseline); with the remote teacher it excludes the teacher replica. "
                 f"Total benchmark wall time: {meta.get('wall_time_s', 0) / 60:.1f} min.")
    if meta.get("postscript"):
        lines.append(f"- {meta['postscript']}")
    lines += ttq_lines(report)
    lines += pool_lines(meta)
    lines += calibration_lines(meta)
    lines += cost_lines(report) + selection_lines(report) + answer_dtype_lines(report)
    lines.append("- `clip + embed_kd` asks the teacher only once, for its class centroids "
                 "(100 center views per class), not per batch.")
    notes = reading_notes(report, base)
    if notes:
        lines += ["", "## Reading the numbers", "", *notes]
    lines += ["", *ranking_note(summary, base, meta.get("data_name", "digits"))]
    return "\n".join(lines) + "\n"


def _clock(t: dict, clock: str, fmt: str) -> str:
    if t.get(clock) is None:
        return "never"
    lo, hi = t.get(f"{clock}_lo"), t.get(f"{clock}_hi")
    span = f" [{lo:{fmt}}, {hi:{fmt}}]" if t["reached"] > 1 and lo is not None and lo != hi else ""
    return f"{t[clock]:{fmt}}{span}"


def ttq_lines(report: dict) -> list[str]:
    """Time-to-quality: what each row spent to reach the no-teacher rows' final zero-shot top-1."""
    ttq = report.get("time_to_baseline") or {}
    if not ttq:
        return []
    target = next(iter(ttq.values()))["threshold"]
    lines = ["", f"## Time to the no-teacher student's final zero-shot top-1 ({100 * target:.1f} %)", "",
             f"Each run evaluated on the val split every {report['meta'].get('eval_every')} optimizer steps and "
             "after its last; the first evaluation at or above the target. Mean [95 % interval] over the seeds "
             "that reached it; training wall time excludes the evaluations; teacher-seconds are the pool's "
             "forward time spent on the run's requests.", "",
             "| run | seeds reaching it | optimizer steps | samples seen | training wall s | teacher-seconds |",
             "|---|---|---|---|---|---|"]
    for name, t in ttq.items():
        lines.append(f"| {name} | {t['reached']} of {t['runs']} | {_clock(t, 'step', '.0f')} | "
                     f"{_clock(t, 'samples_seen', '.0f')} | {_clock(t, 'train_wall_s', '.0f')} | "
                     f"{_clock(t, 'teacher_s', '.1f')} |")
    return lines


def pool_lines(meta: dict) -> list[str]:
    """The shared pool's work: runs of one seed ran at once and asked for the same views."""
    pool = meta.get("pool")
    if not pool or not pool.get("samples"):
        return []
    ratio = pool["samples_computed"] / pool["samples"]
    reused = (f" Counts cover the runs trained here, not the {meta.get('reused_runs')} runs reused from "
              f"{', '.join(f'`{f}`' for f in meta.get('reuse_from', []))}." if meta.get("reused_runs") else "")
    return [f"- One teacher pool served every run, {meta.get('concurrent', 1)} `kd train` processes at a time "
            f"(`cluster.sweep.run_sweep`, what `kd sweep` runs; the runs of one seed together). It answered "
            f"{pool['samples']:,} samples and computed {pool['samples_computed']:,}: computed/answered = "
            f"{ratio:.3f}: {pool['samples_coalesced']:,} joined an identical request in flight and "
            f"{pool['samples_from_cache']:,} came from the replicas' table of recent rows (another run had "
            f"asked for the same view), {pool['forward_s']:.0f} s of teacher forwards in all.{reused}"]


def calibration_lines(meta: dict) -> list[str]:
    """Which weight each method runs at, and the calibration it came from."""
    cal = meta.get("calibration")
    if not cal:
        return []
    lines = ["", "## Weights", "", f"Chosen on seeds {cal.get('seeds')} from the grid ×{cal.get('grid')} of each "
             f"method's default weight (`{cal.get('file')}`): the factor with the best mean zero-shot top-1.", "",
             "| method | chosen factor | mean top-1 % by factor |", "|---|---|---|"]
    for method, c in cal["methods"].items():
        by = ", ".join(f"×{f}: {100 * v:.1f}" for f, v in c["mean_top1_by_factor"].items())
        lines.append(f"| {method} | ×{c['factor']:g} | {by} |")
    return lines


COST_MODES = ("remote", "hybrid", "cache", "inline")


def run_costs(args, data: Path, row: str, spec: dict, tcfg: TeacherConfig, address: str) -> dict[str, list[dict]]:
    """`row`'s recipe in every teacher mode, one run at a time, with the teacher-seconds each spent:
    the pool's forward seconds during the run (remote, hybrid), the precompute's teacher seconds
    (cache: paid once per seed and view set, before training), the workers' time blocked in the
    teacher's forward (inline: rank 0's `teacher_wait_s` × workers). Hybrid runs twice per seed on
    one cache: cold (every sample a miss), then warm (the same views, now cached)."""
    from teacher_service.cache.precompute import precompute

    out: dict[str, list[dict]] = {}
    for seed in args.cost_seeds or args.seeds:
        for mode in args.cost_modes:
            cache = Path(args.workdir) / "cost-caches" / f"{mode}-s{seed}"
            passes = ("hybrid (cold)", "hybrid (warm)") if mode == "hybrid" else (mode,)
            pre_s = 0.0
            if mode == "cache":
                summary = precompute([str(p) for p in sorted(data.glob("train-*.tar"))], str(cache),
                                     views=args.epochs, teacher=tcfg, image_size=32, seed=seed, progress=False)
                pre_s = summary.teacher_s
            for label in passes:
                fresh_pool(tcfg)  # no recent rows from the previous pass: each pass pays for its own views
                before = pool_counts(APP)
                run_spec = {**spec, "mode": mode, "cache_path": str(cache) if mode in ("cache", "hybrid") else None}
                row_out = run_group(args, data, [(f"{row} [{label}]", run_spec, seed)], tcfg, address)[0]
                after = pool_counts(APP)
                pool_s = after["forward_s"] - before["forward_s"]
                inline_s = (row_out.get("teacher_wait_s") or 0.0) * args.workers
                row_out["teacher_s"] = round({"cache": pre_s, "inline": inline_s}.get(mode, pool_s), 2)
                row_out["mode"] = label
                out.setdefault(label, []).append(row_out)
                print(f"    cost {label} seed {seed}: teacher {row_out['teacher_s']} s, top-1 "
                      f"{row_out.get('zero_shot_top1')}", flush=True)
    return out


def fresh_pool(tcfg: TeacherConfig) -> None:
    """The benchmark's teacher app, redeployed: replicas without the previous runs' recent rows."""
    from ray import serve

    from teacher_service.app import deploy

    if APP in serve.status().applications:
        serve.delete(APP)
    deploy(tcfg).info.remote().result(timeout_s=300)


def cost_lines(report: dict) -> list[str]:
    cost = report.get("cost")
    if not cost:
        return []
    lines = ["", f"## What each teacher mode buys ({report['meta']['cost_row']})", "",
             "| mode | zero-shot top-1 % | teacher-seconds per run | wall s per run | seeds |", "|---|---|---|---|---|"]
    for label, runs in cost.items():
        s = summarise(runs)
        teacher = [r["teacher_s"] for r in runs if "teacher_s" in r]
        wall = [r["wall_time_s"] for r in runs if r.get("wall_time_s")]
        lines.append(f"| {label} | {_cell(s, 'zero_shot_top1', True)} | "
                     f"{statistics.fmean(teacher):.1f} | {statistics.fmean(wall):.0f} | {s['runs']} |" if teacher and wall
                     else f"| {label} | failed | | | |")
    lines += ["", "Teacher-seconds: the pool's forward seconds during the run (remote, hybrid), the precompute's "
              "(cache; paid once, before training, for all its epochs' views), the workers' time in the "
              "teacher's forward (inline). All on the same CPU cores here; on a cluster remote and hybrid spend "
              "them on the teacher's node, inline on every student worker."]
    return lines


def _against_default_recipe(report: dict, names: list[str]):
    """(name, finished runs, their summary) per row of `names`, gains paired by seed with the default
    recipe's runs (the default recipe itself unpaired); the summary is None for a row not run."""
    base = report["runs"].get(DEFAULT_RECIPE)
    for name in names:
        runs = [r for r in report["runs"].get(name, []) if "error" not in r]
        yield name, runs, summarise(runs, base if name != DEFAULT_RECIPE else None) if runs else None


def selection_lines(report: dict) -> list[str]:
    """The default recipe with and without data selection: what each row drew, trained on and paid,
    its top-1 and its gain over the default recipe paired by seed."""
    rows = [n for n, spec in report["methods"].items() if n == DEFAULT_RECIPE or spec.get("selection")]
    if len(rows) < 2:
        return []
    lines = ["", "## Data selection (issue 30)", "",
             f"`{DEFAULT_RECIPE}` is {DEFAULT_DISTILL_LOSSES}; a selection row draws k × batch per worker "
             "each step and trains on the batch that scores highest (`uniform`: the first rows), for --epochs × k "
             "epochs: every row takes the same optimizer steps (up to an epoch's last partial super-batch). Figures "
             "are means over the seeds; teacher-s is the run's teacher-seconds (the pool's scoring included), "
             "selection teacher-s what the workers counted for the super-batches (their answers, the pool's "
             "scoring, and scores the run computed from embeddings it held).", "",
             "| row | steps | samples seen / trained | teacher-s | selection teacher-s | student scoring s | "
             "answers MB | zero-shot top-1 % | gain vs default recipe, paired (points) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs, s in _against_default_recipe(report, rows):
        if not runs:
            lines.append(f"| {name} | not run | | | | | | | | |")
            continue

        def mean(key: str, fmt: str = ".0f", scale: float = 1.0) -> str:
            values = [r[key] * scale for r in runs if r.get(key) is not None]
            return format(statistics.fmean(values), fmt) if values else "—"

        lines.append(f"| {name} | {mean('step')} | {mean('samples_seen')} / {mean('samples_trained')} | "
                     f"{mean('teacher_s', '.1f')} | {mean('selection_teacher_s', '.1f')} | "
                     f"{mean('selection_student_s', '.1f')} | {mean('selection_bytes', '.1f', 1e-6)} | "
                     f"{_cell(s, 'zero_shot_top1', True)} | "
                     f"{_cell(s, 'gain_zero_shot_top1', True, signed=True) if name != DEFAULT_RECIPE else ''} | "
                     f"{s['runs']} |")
    return lines


def answer_dtype_lines(report: dict) -> list[str]:
    """The default recipe trained from fp16, bf16 and int8 teacher answers: its top-1 and the gain of
    each compressed dtype over fp16 paired by seed (the answers' bytes and error: answer_codec.md)."""
    rows = [n for n, spec in report["methods"].items() if spec.get("answer_dtype")]
    if not rows:
        return []
    lines = ["", "## Compressed teacher answers (issue 29 item 5)", "",
             f"`{DEFAULT_RECIPE}` ({DEFAULT_DISTILL_LOSSES}) with the pool answering in fp16 (its default), "
             "bf16 and int8 (one scale per row): same runs otherwise, gain paired by seed with the fp16 run. "
             "What each dtype costs on the wire and in the cache, and its error on these embeddings: "
             "[answer_codec.md](answer_codec.md).", "",
             "| row | answers | zero-shot top-1 % | gain vs fp16 answers, paired (points) | seeds |",
             "|---|---|---|---|---|"]
    for name, runs, s in _against_default_recipe(report, [DEFAULT_RECIPE, *rows]):
        if not runs:
            lines.append(f"| {name} | {report['methods'][name].get('answer_dtype', 'fp16')} | not run | | |")
            continue
        gain = _cell(s, "gain_zero_shot_top1", True, signed=True) if name != DEFAULT_RECIPE else ""
        lines.append(f"| {name} | {report['methods'][name].get('answer_dtype', 'fp16')} | "
                     f"{_cell(s, 'zero_shot_top1', True)} | {gain} | {s['runs']} |")
    return lines


def plot_cost(report: dict, path: Path) -> None:
    """Student top-1 against teacher-seconds, one point per mode (mean over seeds, 95 % interval)."""
    from cluster.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in report.get("cost", {}).items():
        ok = [r for r in runs if "teacher_s" in r and "zero_shot_top1" in r]
        if not ok:
            continue
        mean, lo, hi = interval([100 * r["zero_shot_top1"] for r in ok])
        t = statistics.fmean(r["teacher_s"] for r in ok)
        ax.errorbar([t], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=3, label=label)
    base = report["summary"].get(BASELINE, {}).get("zero_shot_top1")
    if base is not None:
        ax.axhline(100 * base, color="0.3", linestyle="--", label="no teacher")
    ax.set_xlabel("teacher-seconds per student run")
    ax.set_ylabel("zero-shot top-1 %")
    ax.set_title(report["meta"]["cost_row"])
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot(report: dict, path: Path) -> None:
    """Zero-shot top-1 per row: mean with its 95 % interval, the no-teacher mean and the teacher."""
    from cluster.plots import pyplot, save_png

    plt = pyplot()

    rows = [(n, s) for n, s in report["summary"].items() if s.get("runs")]
    if not rows:
        return
    curves = report.get("time_to_baseline")
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(15 if curves else 8, 0.45 * len(rows) + 1.5))
    ax = axes[0] if curves else axes
    means = [100 * s["zero_shot_top1"] for _, s in rows]
    errs = [[100 * (s["zero_shot_top1"] - s["zero_shot_top1_lo"]) for _, s in rows],
            [100 * (s["zero_shot_top1_hi"] - s["zero_shot_top1"]) for _, s in rows]]
    ax.barh(range(len(rows)), means, xerr=errs, color=["0.6" if n == BASELINE else "C0" for n, _ in rows], capsize=3)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.invert_yaxis()
    base = report["summary"].get(BASELINE, {}).get("zero_shot_top1")
    if base is not None:
        ax.axvline(100 * base, color="0.3", linestyle="--", label="no teacher (mean)")
    teacher = report["meta"].get("teacher_eval", {}).get("zero_shot_top1")
    if teacher is not None:
        ax.axvline(100 * teacher, color="C3", linestyle=":", label="teacher")
    meta = report["meta"]
    ax.set_xlabel(f"zero-shot top-1 % on {meta.get('data_name', 'digits')} val "
                  f"(mean, 95 % interval over seeds {meta['seeds']})")
    ax.set_title(f"{meta.get('student', STUDENT)}, {meta['epochs']} epochs, teacher {meta['teacher_model']}")
    ax.legend(loc="lower right", fontsize=8)
    if curves:
        plot_curves(report, axes[1])
    save_png(fig, path)


def plot_curves(report: dict, ax) -> None:
    """Each row's evaluation curve, zero-shot top-1 against optimizer steps, averaged over its seeds
    at the shared evaluation steps, with the no-teacher final as the time-to-quality line."""
    for i, (name, runs) in enumerate(report["runs"].items()):
        by_step: dict[int, list[float]] = {}
        for run in runs:
            for point in run.get("curve") or []:
                if point.get("zero_shot_top1") is not None:
                    by_step.setdefault(point["step"], []).append(point["zero_shot_top1"])
        if by_step:
            steps = sorted(by_step)
            style = {"color": "0.3", "linewidth": 2.5} if name == BASELINE else {"color": f"C{i % 10}"}
            ax.plot(steps, [100 * statistics.mean(by_step[t]) for t in steps], label=name, **style)
    target = report["summary"].get(BASELINE, {}).get("zero_shot_top1")
    if target is not None:
        ax.axhline(100 * target, color="0.3", linestyle="--")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("zero-shot top-1 % (mean over seeds)")
    ax.set_title("evaluation curves: time to the no-teacher final (dashed)")
    ax.legend(fontsize=7)


def time_to_baseline(report: dict) -> dict[str, dict]:
    """Per row with evaluation curves: the clocks (steps, samples, training wall seconds,
    teacher-seconds) at which each seed's student first reached the no-teacher rows' mean final
    zero-shot top-1, with intervals over the seeds that got there (`student_trainer.curves`)."""
    from student_trainer.curves import time_to_quality

    target = report["summary"].get(BASELINE, {}).get("zero_shot_top1")
    if target is None:
        return {}
    out = {}
    for name, runs in report["runs"].items():
        traced = [r for r in runs if "error" not in r and r.get("curve")]
        if traced:
            out[name] = {**time_to_quality([r["curve"] for r in traced], target), "seeds": [r["seed"] for r in traced]}
    return out


def result_rows(report: dict) -> dict:
    """The report in the results schema of issue 29: the teacher, then one entry per row with its
    per-seed figures, the paired gain's interval and the steps each seed took to the baseline (and,
    for a data-selection row, its `selection`: score and k)."""
    rows = []
    for name, spec in report["methods"].items():
        s, ttq = report["summary"].get(name, {}), report.get("time_to_baseline", {}).get(name, {})
        ok = [r for r in report["runs"][name] if "error" not in r]
        steps = {seed: (p or {}).get("step") for seed, p in zip(ttq.get("seeds", []), ttq.get("per_run", []))}
        rows.append({"name": name, "losses": spec["losses"], "answer_dtype": spec.get("answer_dtype", "fp16"),
                     "teacher": bool(spec.get("teacher")), "inherit": bool(spec.get("inherit")),
                     "teachers": spec.get("apps") or ([APP] if spec.get("teacher") else []),
                     "seeds": [r["seed"] for r in ok], "zero_shot_top1": [r["zero_shot_top1"] for r in ok],
                     "gain_vs_baseline_ci95": ([s["gain_zero_shot_top1_lo"], s["gain_zero_shot_top1_hi"]]
                                               if "gain_zero_shot_top1_lo" in s and name != BASELINE else None),
                     "steps_to_baseline_final": [steps.get(r["seed"]) for r in ok] if ttq else None,
                     **({"selection": spec["selection"]} if spec.get("selection") else {})})  # issue 30
    meta = report["meta"]
    return {"teacher": {"model": meta.get("teacher_model"), "fingerprint": meta.get("teacher_fingerprint"),
                        **meta.get("teacher_eval", {})},
            "second_teacher": meta.get("second_teacher"), "rows": rows}


def save(report: dict, out: Path) -> None:
    baseline = report["runs"].get(BASELINE)
    report["summary"] = {name: summarise(runs, baseline) for name, runs in report["runs"].items()}
    report["time_to_baseline"] = time_to_baseline(report)
    report.update(result_rows(report))
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    write_atomic(out, render(report))


def rerender(out: Path) -> dict:
    """Re-render the table and notes from `<out>.json`, filling meta fields older runs lacked."""
    report = json.loads(out.with_suffix(".json").read_text())
    meta = report["meta"]
    if "teacher_embed_dim" not in meta:
        meta.update(model_facts(Path(meta["teacher_dir"])))
    rows = [r for seed in meta["seeds"] for name in report["methods"]
            for r in report["runs"][name] if r.get("seed") == seed]
    loads = meta.get("load_avg_1m_runs") or []
    if len(loads) == len(rows):  # recorded in run order before rows carried their own
        for row, load in zip(rows, loads):
            row.setdefault("load_avg_1m", load)
    save(report, out)
    plot(report, out.with_suffix(".png"))
    if report.get("cost"):
        plot_cost(report, out.with_name(out.stem + "_cost.png"))
    print(out.read_text())
    return report


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", help="student-format teacher checkpoint dir (required to train)")
    parser.add_argument("--data-dir", help="digits shards (default: <teacher-dir>/../data, else written)")
    parser.add_argument("--workdir", default="/tmp/kd-methods-bench", help="run storage")
    parser.add_argument("--student", default=STUDENT, help="the student preset or open_clip architecture every row trains")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="evaluate each run on the val split every N optimizer steps (its curve gives the "
                             "time-to-quality columns: steps to the no-teacher rows' final zero-shot top-1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--teacher-mode", choices=("remote", "inline"), default="remote")
    parser.add_argument("--with-siglip", action="store_true", help="add SigLIP (no teacher) as a task-loss row")
    parser.add_argument("--only", nargs="+", help="run only these rows (by their table name)")
    parser.add_argument("--with-inherit", action="store_true",
                        help=f"follow each row with its twin whose student starts from the teacher's weights "
                             f"(row name + {INHERITED.strip()!r})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods.md"))
    parser.add_argument("--address", help="Ray cluster address (default: an embedded local cluster)")
    parser.add_argument("--concurrent", type=int, default=2,
                        help="student runs at once on the shared pool (each a `kd train` process, as `kd sweep`)")
    parser.add_argument("--grid", type=float, nargs="+", default=[1.0],
                        help="factors of each method's default weight to run (calibration), e.g. 0.25 1 4")
    parser.add_argument("--choose", help="after the runs, write each method's best grid factor to this JSON")
    parser.add_argument("--weights-from", help="run each method at the factor a --choose file picked")
    parser.add_argument("--cost-row", help="also run this row in every --cost-modes mode, one run at a time, "
                                           "and report teacher-seconds against accuracy (OUT_cost.png)")
    parser.add_argument("--cost-modes", nargs="+", choices=COST_MODES, default=list(COST_MODES))
    parser.add_argument("--cost-seeds", type=int, nargs="+", help="seeds of the cost runs (default: --seeds)")
    parser.add_argument("--cost-only", action="store_true", help="only the cost runs (no table runs)")
    parser.add_argument("--reuse-from", nargs="+", default=[],
                        help="earlier report JSONs whose runs of the same row, seed, budget, teacher and data "
                             "are taken as they are instead of being trained again")
    parser.add_argument("--second-teacher-dir",
                        help="a second trained teacher (another architecture or seed): adds the rows "
                             f"'clip + {ENSEMBLE_METHOD} (teacher 2)' and '(teachers 1 + 2)' (an ensemble of both pools)")
    parser.add_argument("--answer-dtypes", nargs="+", choices=[d for d in ANSWER_DTYPES if d != "fp16"],
                        help="also run the default recipe with the teacher answering in each of these dtypes, "
                             "beside fp16 (issue 29 item 5)")
    parser.add_argument("--selection", nargs="+", type=selection_arg, metavar="SCORE:K",
                        help=f"add the rows '{DEFAULT_RECIPE}' and, per SCORE:K, the default recipe with data "
                             f"selection (SCORE one of {SELECTION_SCORES}), trained --epochs × K epochs: the same "
                             "optimizer steps as the other rows")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the .md from the existing .json (no training)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The arguments, refused before anything starts where they cannot make a report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render_only:
        return args
    if not args.teacher_dir:
        parser.error("--teacher-dir is required (a trained teacher, e.g. the demo's <workdir>/teacher)")
    if args.choose and Path(args.choose).resolve() == Path(args.out).with_suffix(".json").resolve():
        parser.error(f"--choose {args.choose} is the report's own JSON (--out {args.out} writes it): the chosen "
                     f"factors would replace the runs; name another file, e.g. methods_weights.json")
    return args


def rows_to_run(args: argparse.Namespace) -> tuple[dict[str, dict], Optional[dict]]:
    """The table's rows (`methods_to_run`, plus the ensemble rows with a second teacher) and the
    calibration their weights come from (`--weights-from`), if any."""
    calibration = json.loads(Path(args.weights_from).read_text()) if args.weights_from else None
    chosen = {m: c["factor"] for m, c in calibration["methods"].items()} if calibration else None
    extra = ensemble_rows(chosen) if args.second_teacher_dir else {}
    only = [n for n in args.only if n not in extra] if args.only else None
    methods = methods_to_run(args.with_siglip, only, args.with_inherit, tuple(args.grid), chosen)
    methods.update({k: v for k, v in extra.items() if not args.only or k in args.only})
    methods.update(selection_rows(args.selection) if args.selection else {})  # asked for by --selection itself
    methods.update(answer_dtype_rows(args.answer_dtypes) if args.answer_dtypes else {})
    return methods, calibration


def new_report(args: argparse.Namespace, argv: Optional[list[str]], data: Path, tcfg: TeacherConfig,
               tcfg_2: Optional[TeacherConfig], methods: dict[str, dict], calibration: Optional[dict]) -> dict:
    """The report before any run: what was run, on what, and both teachers evaluated on the val split."""
    from student_trainer.evaluate import evaluate_teacher
    from student_trainer.factory import count_parameters, create_student

    teacher_dir = Path(args.teacher_dir).resolve()
    teacher_eval = evaluate_teacher(tcfg, str(data / "val-*.tar"))
    second = {}
    if tcfg_2 is not None:
        eval_2 = evaluate_teacher(tcfg_2, str(data / "val-*.tar"))
        second = {"second_teacher": {"dir": str(Path(args.second_teacher_dir).resolve()),
                                     "model": load_model_config(Path(args.second_teacher_dir)).name,
                                     "overrides": tcfg_2.overrides, "fingerprint": eval_2.pop("fingerprint", None),
                                     "eval": eval_2}}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, "
                   f"torch 1 thread per worker",
        "epochs": args.epochs, "batch_size": args.batch_size, "workers": args.workers,
        "global_batch": args.batch_size * args.workers, "seeds": args.seeds,
        "teacher_dir": str(teacher_dir), "teacher_model": load_model_config(teacher_dir).name,
        "teacher_mode": args.teacher_mode, "teacher_fingerprint": teacher_eval.get("fingerprint"),
        "teacher_eval": {k: v for k, v in teacher_eval.items() if k != "fingerprint"},
        "student": args.student, "eval_every": args.eval_every, "data_name": data_name(data),
        "student_params": count_parameters(create_student(ModelConfig(name=args.student))),
        "data_dir": str(data),
        "load_avg_1m_start": round(os.getloadavg()[0], 2), "concurrent": args.concurrent,
        "calibration": {**calibration, "file": args.weights_from} if calibration else None,
        **model_facts(teacher_dir, args.student), **second,
    }
    return {"meta": meta, "methods": methods, "runs": {name: [] for name in methods}}


def runs_to_train(args: argparse.Namespace, report: dict) -> list[tuple[str, dict, int]]:
    """Every (row, spec, seed) of the table, less those an earlier report (`--reuse-from`) already
    ran under the same budget, teacher and data: those go into `report` as they are."""
    methods = report["methods"]
    items = [] if args.cost_only else [(name, spec, seed) for seed in args.seeds for name, spec in methods.items()]
    reusable = reusable_runs(args.reuse_from, report["meta"], methods)
    reused = [(name, seed) for name, _, seed in items if (name, seed) in reusable]
    for name, seed in reused:
        report["runs"][name].append(reusable[name, seed])
    items = [item for item in items if (item[0], item[2]) not in reusable]
    report["meta"].update(reused_runs=len(reused), reuse_from=args.reuse_from)
    if reused:
        print(f"reused {len(reused)} runs from {args.reuse_from}; {len(items)} to train", flush=True)
    return items


def train_table(args: argparse.Namespace, report: dict, data: Path, tcfg: TeacherConfig,
                tcfg_2: Optional[TeacherConfig], address: str, out: Path) -> None:
    """The table's runs, `--concurrent` at a time on the shared pool(s), the report saved after each
    group (a long benchmark stopped halfway keeps what it measured); the pools are deleted after."""
    from ray import serve

    from teacher_service.app import deploy

    bench_start = time.perf_counter()
    if args.teacher_mode == "remote":
        deploy(tcfg).info.remote().result(timeout_s=300)
    if tcfg_2 is not None:
        deploy(tcfg_2).info.remote().result(timeout_s=300)
    items = runs_to_train(args, report)
    groups = [items[i:i + args.concurrent] for i in range(0, len(items), args.concurrent)]
    try:
        start_counts = pool_counts(APP) if args.teacher_mode == "remote" else None
        for group in groups:
            print(f"[{time.strftime('%H:%M:%S')}] " + "; ".join(f"{n} seed {sd}" for n, _, sd in group), flush=True)
            for (name, _, _), row in zip(group, run_group(args, data, group, tcfg, address)):
                row["load_avg_1m"] = round(os.getloadavg()[0], 2)
                report["runs"][name].append(row)
                report["meta"]["val_samples"] = row.get("val_samples", report["meta"].get("val_samples"))
                print(f"    {name}: {json.dumps({k: v for k, v in row.items() if k in EVAL_KEYS or k == 'error'})}",
                      flush=True)
            report["meta"]["wall_time_s"] = round(time.perf_counter() - bench_start, 1)
            if start_counts is not None:
                now = pool_counts(APP)
                report["meta"]["pool"] = {k: round(now[k] - start_counts[k], 3) for k in now}
            save(report, out)
    finally:
        if args.teacher_mode == "remote":
            serve.delete(APP)
        if tcfg_2 is not None:
            serve.delete(APP_2)


def cost_table(args: argparse.Namespace, report: dict, data: Path, tcfg: TeacherConfig, address: str,
               out: Path) -> None:
    """`--cost-row` in every `--cost-modes` mode (`run_costs`), saved with its plot."""
    from ray import serve

    if args.cost_row not in report["methods"]:
        raise SystemExit(f"--cost-row {args.cost_row!r} is not one of the rows run: {list(report['methods'])}")
    try:
        report["meta"]["cost_row"] = args.cost_row
        report["cost"] = run_costs(args, data, args.cost_row, report["methods"][args.cost_row], tcfg, address)
        save(report, out)
        plot_cost(report, out.with_name(out.stem + "_cost.png"))
    finally:
        serve.delete(APP)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.render_only:
        return rerender(Path(args.out))
    import ray

    from cluster.local import init_ray

    print(init_ray(args.address, quiet=True), flush=True)
    tcfg = teacher_config(Path(args.teacher_dir).resolve())
    tcfg_2 = teacher_config(Path(args.second_teacher_dir).resolve(), APP_2) if args.second_teacher_dir else None
    data = find_data(args)
    methods, calibration = rows_to_run(args)
    out = Path(args.out)
    report = new_report(args, argv, data, tcfg, tcfg_2, methods, calibration)
    address = ray.get_runtime_context().gcs_address
    train_table(args, report, data, tcfg, tcfg_2, address, out)
    if args.cost_row:
        cost_table(args, report, data, tcfg, address, out)
    if args.choose:
        picked = {"seeds": args.seeds, "grid": args.grid, "epochs": args.epochs, "from": str(out),
                  "methods": choose_factors(report)}
        write_atomic(Path(args.choose), json.dumps(picked, indent=2))
    plot(report, out.with_suffix(".png"))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
