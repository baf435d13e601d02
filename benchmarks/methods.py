"""Distillation methods compared under one budget: the same student, data, epochs, batch and seed.

Trains the `digits-student` preset on the digits train split with: no teacher (CLIP loss only),
each method alone added to the CLIP task loss (kl, crd, fd, mfd, icl, gd, afd, embed_kd; their
authors' weights, `student_trainer.losses.DEFAULT_WEIGHTS`), CLIP-KD's combination
(clip + crd + icl + fd at 1/1/2000), and optionally SigLIP as the task loss with no teacher.
`--with-inherit` adds, beside each row, the same run with the student initialised from the
teacher's weights (`model.init_from_teacher`, TinyCLIP's weight inheritance) at the same budget.
Each student is evaluated on the val split (zero-shot top-1, retrieval R@1 both ways); the table
goes to `benchmarks/results/methods.md` and `methods.json` (rewritten atomically after each run).

The teacher is a trained student-format checkpoint (model.pt + model_config.json, e.g. the
demo's `<workdir>/teacher`), deployed once as a Serve app that every run shares (`--teacher-mode
remote`, default) or loaded inside each worker (`inline`). Data defaults to the shards beside it.

    python benchmarks/methods.py --teacher-dir /tmp/demo-full/teacher --epochs 10 --seeds 0
    python benchmarks/methods.py --teacher-dir /tmp/demo-full/teacher --only "clip + icl" --with-inherit \
        --epochs 5 --seeds 0 1 --out /tmp/inherit/methods.md
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
    DataConfig,
    ModelConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.factory import resolve_model
from student_trainer.losses import DEFAULT_WEIGHTS
from teacher_service.config import TeacherConfig

STUDENT = "digits-student"
APP = "kd-methods-bench-teacher"
SINGLE = ("kl", "crd", "fd", "mfd", "icl", "gd", "afd", "embed_kd")
CLIP_KD_PUBLISHED = ("fd", "mfd", "icl", "crd", "gd", "afd")  # ViT-B/16 → ViT-T/16, zero-shot IN top-1
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # open_clip's SigLIP init
INHERITED = " (init from teacher)"  # suffix of a row whose student starts from the teacher's weights


def methods_to_run(with_siglip: bool, only: Optional[list[str]] = None,
                   with_inherit: bool = False) -> dict[str, dict]:
    """Row name → {"losses": weights, "teacher": bool, "overrides": model overrides, "inherit": bool};
    with `with_inherit` each row is followed by its twin that starts from the teacher's weights."""
    rows = {"no teacher (clip)": {"losses": {"clip": 1.0}, "teacher": False, "overrides": {}}}
    if with_siglip:
        rows["no teacher (siglip)"] = {"losses": {"siglip": 1.0}, "teacher": False, "overrides": SIGLIP_INIT}
    for name in SINGLE:
        rows[f"clip + {name}"] = {"losses": {"clip": 1.0, name: DEFAULT_WEIGHTS[name]}, "teacher": True,
                                  "overrides": {}}
    rows["clip + icl + kl"] = {"losses": {"clip": 1.0, "icl": DEFAULT_WEIGHTS["icl"], "kl": DEFAULT_WEIGHTS["kl"]},
                               "teacher": True, "overrides": {}}
    rows["CLIP-KD (clip+crd+icl+fd)"] = {
        "losses": {"clip": 1.0, "crd": DEFAULT_WEIGHTS["crd"], "icl": DEFAULT_WEIGHTS["icl"],
                   "fd": DEFAULT_WEIGHTS["fd"]}, "teacher": True, "overrides": {}}
    if only:
        unknown = sorted(set(only) - set(rows))
        if unknown:
            raise SystemExit(f"unknown --only rows {unknown}; known: {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in only}
    rows = {k: {**v, "inherit": False} for k, v in rows.items()}
    if not with_inherit:
        return rows
    twinned = {}
    for name, spec in rows.items():
        twinned[name] = spec
        twinned[name + INHERITED] = {**spec, "inherit": True}
    return twinned


def teacher_config(teacher_dir: Path) -> TeacherConfig:
    """As `cluster/demo.py::_teacher_config`: the checkpoint's architecture, weights from model.pt."""
    if not (teacher_dir / "model.pt").is_file():
        raise SystemExit(f"--teacher-dir {teacher_dir}: no model.pt (a student checkpoint dir is expected)")
    arch, overrides = resolve_model(load_model_config(teacher_dir))
    return TeacherConfig(model=arch, overrides=overrides, pretrained=str(teacher_dir / "model.pt"),
                         app_name=APP, num_cpus=1.0, max_batch_size=256, torch_threads=1)


def model_facts(teacher_dir: Path) -> dict:
    """Widths and patch counts the notes under the table refer to."""
    from student_trainer.factory import create_student
    from student_trainer.masking import num_patches

    _, overrides = resolve_model(load_model_config(teacher_dir))
    return {"teacher_embed_dim": overrides.get("embed_dim"),
            "student_patches": num_patches(create_student(ModelConfig(name=STUDENT)))}


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
    mode = args.teacher_mode if spec["teacher"] else "none"
    inherit = bool(spec.get("inherit"))  # the weights come from the teacher's config in every mode
    return TrainConfig(
        run_name=f"methods-{_slug(name)}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str(Path(args.workdir) / "runs"),
        model=ModelConfig(name=STUDENT, overrides=dict(spec["overrides"]), init_from_teacher=inherit),
        data=DataConfig(train_shards=str(data / "train-*.tar"), val_shards=str(data / "val-*.tar"),
                        image_size=32, batch_size=args.batch_size),
        teacher=TeacherSourceConfig(mode=mode, app_name=APP, teacher=tcfg if mode == "inline" or inherit else None),
        losses=dict(spec["losses"]), epochs=args.epochs, num_workers=args.workers, seed=seed,
        log_every_steps=0, torch_threads=1,
    ).validate()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_one(args, data: Path, name: str, spec: dict, seed: int, tcfg: TeacherConfig) -> dict:
    from student_trainer.evaluate import evaluate_checkpoint
    from student_trainer.train import run_training

    cfg = train_cfg(args, data, name, spec, seed, tcfg)
    start = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - start
    with result.checkpoint.as_directory() as d:
        ev = evaluate_checkpoint(d, str(data / "val-*.tar"))
        scales = final_scales(Path(d))
        init = (read_provenance(d) or {}).get("init")
    m = result.metrics
    return {
        "seed": seed, "zero_shot_top1": ev["zero_shot_top1"], "zero_shot_top5": ev["zero_shot_top5"],
        "i2t_r1": ev["i2t_r1"], "t2i_r1": ev["t2i_r1"], "val_samples": ev["samples"],
        "samples_per_s": m.get("run_samples_per_s"), "peak_rss_mb": m.get("peak_rss_mb"),
        "peak_gpu_mem_mb": m.get("peak_gpu_mem_mb"), "wall_time_s": round(wall, 1),
        "teacher_requests": m.get("teacher_requests"), **scales, "init": init,
        "final_losses": {k: v for k, v in m.items() if k.endswith("_loss")},
    }


def final_scales(checkpoint_dir: Path) -> dict:
    """The trained student's exponentiated logit scale (and SigLIP bias), for the notes."""
    import torch

    state = torch.load(checkpoint_dir / "model.pt", map_location="cpu", weights_only=True)
    out = {"logit_scale": round(float(state["logit_scale"].exp()), 4)}
    if state.get("logit_bias") is not None:
        out["logit_bias"] = round(float(state["logit_bias"]), 4)
    return out


# --------------------------------------------------------------------------- report
METRICS = ("zero_shot_top1", "i2t_r1", "t2i_r1", "samples_per_s", "peak_rss_mb")


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {"runs": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _cell(s: dict, key: str, pct: bool) -> str:
    if key not in s:
        return "—"
    fmt = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.0f}")
    if s["runs"] > 1 and s[f"{key}_min"] != s[f"{key}_max"]:
        return f"{fmt(s[key])} ({fmt(s[key + '_min'])}–{fmt(s[key + '_max'])})"
    return fmt(s[key])


def _load(runs: list[dict]) -> str:
    loads = [r["load_avg_1m"] for r in runs if r.get("load_avg_1m") is not None]
    return f"{statistics.median(loads):.1f}" if loads else "—"


def ranking_note(summary: dict[str, dict], base: Optional[float]) -> list[str]:
    """Where our order of the six CLIP-KD methods differs from the published one."""
    ours = [(m, summary.get(f"clip + {m}", {}).get("zero_shot_top1")) for m in CLIP_KD_PUBLISHED]
    ours = [(m, v) for m, v in ours if v is not None]
    if len(ours) < 2:
        return []
    order = [m for m, _ in sorted(ours, key=lambda mv: -mv[1])]
    published = [m for m in CLIP_KD_PUBLISHED if m in order]
    lines = ["## Ranking vs CLIP-KD's published one", "",
             f"- CLIP-KD (ViT-B/16 → ViT-T/16, ImageNet zero-shot): {' > '.join(m.upper() for m in published)}",
             "- here (digits val zero-shot top-1): "
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
    base = summary.get("no teacher (clip)", {}).get("zero_shot_top1")
    seeds = meta["seeds"]
    lines = [
        "# Distillation methods on the digits task, one budget",
        "",
        f"Generated by `benchmarks/methods.py` on {meta['date']}; command:",
        "",
        f"    {meta['command']}",
        "",
        f"Machine: {meta['machine']}. Student `{STUDENT}` ({meta['student_params']:,} parameters) trained "
        f"{meta['epochs']} epochs, batch {meta['batch_size']} × {meta['workers']} DDP workers "
        f"({meta['global_batch']} global), AdamW lr 1e-3 warmup 20 + cosine, seed(s) {seeds}; "
        f"teacher `{meta['teacher_model']}` from `{meta['teacher_dir']}` ({meta['teacher_mode']} mode, "
        f"fingerprint {meta.get('teacher_fingerprint', '?')}). Evaluation on the val split "
        f"({meta.get('val_samples', '?')} images, never trained on).",
        "",
        f"Teacher on the same val split: zero-shot top-1 {_pct(meta.get('teacher_eval', {}).get('zero_shot_top1'))}, "
        f"i2t R@1 {_pct(meta.get('teacher_eval', {}).get('i2t_r1'))}, "
        f"t2i R@1 {_pct(meta.get('teacher_eval', {}).get('t2i_r1'))}.",
        "",
        "| run | losses (weights) | zero-shot top-1 % | Δ vs no teacher | i2t R@1 % | t2i R@1 % | samples/s | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        losses = ", ".join(f"{k} {v:g}" for k, v in report["methods"][name]["losses"].items())
        if s["runs"] == 0:
            status = f"failed: {s['errors'][0][:80]}" if s["errors"] else "not run yet"
            lines.append(f"| {name} | {losses} | {status} | | | | | | |")
            continue
        delta = "" if base is None or name == "no teacher (clip)" else f"{100 * (s['zero_shot_top1'] - base):+.1f}"
        lines.append(f"| {name} | {losses} | {_cell(s, 'zero_shot_top1', True)} | {delta} | "
                     f"{_cell(s, 'i2t_r1', True)} | {_cell(s, 't2i_r1', True)} | "
                     f"{_cell(s, 'samples_per_s', False)} | {_cell(s, 'peak_rss_mb', False)} | "
                     f"{_load(report['runs'][name])} |")
    n = meta.get("val_samples") or 0
    se = 100 * math.sqrt(base * (1 - base) / n) if base is not None and n else None
    lines += ["", "## How much to trust this", ""]
    if len(seeds) == 1:
        lines.append("- One seed per run: the seed-to-seed spread is not measured here, so the table "
                     "gives single values, not medians.")
    else:
        lines.append(f"- Median over seeds {seeds}, (min–max) in brackets.")
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
    lines.append("- `clip + embed_kd` asks the teacher only once, for its class centroids "
                 "(100 center views per class), not per batch.")
    notes = reading_notes(report, base)
    if notes:
        lines += ["", "## Reading the numbers", "", *notes]
    lines += ["", *ranking_note(summary, base)]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(report: dict, out: Path) -> None:
    report["summary"] = {name: summarise(runs) for name, runs in report["runs"].items()}
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
    print(out.read_text())
    return report


# --------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", help="student-format teacher checkpoint dir (required to train)")
    parser.add_argument("--data-dir", help="digits shards (default: <teacher-dir>/../data, else written)")
    parser.add_argument("--workdir", default="/tmp/kd-methods-bench", help="run storage")
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
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the .md from the existing .json (no training)")
    args = parser.parse_args(argv)
    if args.render_only:
        return rerender(Path(args.out))
    if not args.teacher_dir:
        parser.error("--teacher-dir is required (a trained teacher, e.g. the demo's <workdir>/teacher)")

    from ray import serve

    from cluster.local import init_ray
    from student_trainer.evaluate import evaluate_teacher
    from student_trainer.factory import count_parameters, create_student
    from teacher_service.app import deploy

    print(init_ray(args.address, quiet=True), flush=True)
    teacher_dir = Path(args.teacher_dir).resolve()
    tcfg = teacher_config(teacher_dir)
    data = find_data(args)
    methods = methods_to_run(args.with_siglip, args.only, args.with_inherit)
    out = Path(args.out)
    teacher_eval = evaluate_teacher(tcfg, str(data / "val-*.tar"))
    report = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, "
                       f"torch 1 thread per worker",
            "epochs": args.epochs, "batch_size": args.batch_size, "workers": args.workers,
            "global_batch": args.batch_size * args.workers, "seeds": args.seeds,
            "teacher_dir": str(teacher_dir), "teacher_model": load_model_config(teacher_dir).name,
            "teacher_mode": args.teacher_mode, "teacher_fingerprint": teacher_eval.get("fingerprint"),
            "teacher_eval": {k: v for k, v in teacher_eval.items() if k != "fingerprint"},
            "student_params": count_parameters(create_student(ModelConfig(name=STUDENT))),
            "data_dir": str(data),
            "load_avg_1m_start": round(os.getloadavg()[0], 2),
            **model_facts(teacher_dir),
        },
        "methods": methods, "runs": {name: [] for name in methods},
    }
    bench_start = time.perf_counter()
    if args.teacher_mode == "remote":
        deploy(tcfg).info.remote().result(timeout_s=300)
    try:
        for seed in args.seeds:
            for name, spec in methods.items():
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} ...", flush=True)
                try:
                    row = run_one(args, data, name, spec, seed, tcfg)
                except Exception as exc:  # one failed method must not lose the others' results
                    row = {"seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                row["load_avg_1m"] = round(os.getloadavg()[0], 2)
                report["runs"][name].append(row)
                report["meta"]["val_samples"] = row.get("val_samples", report["meta"].get("val_samples"))
                report["meta"]["wall_time_s"] = round(time.perf_counter() - bench_start, 1)
                report["meta"]["load_avg_1m_runs"] = report["meta"].get("load_avg_1m_runs", []) + [
                    round(os.getloadavg()[0], 2)]
                save(report, out)
                print(f"    {json.dumps({k: v for k, v in row.items() if k != 'final_losses'})}", flush=True)
    finally:
        if args.teacher_mode == "remote":
            serve.delete(APP)
    print(render(report))
    return report


if __name__ == "__main__":
    main()
