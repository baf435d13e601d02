"""`kd report`: learning curves and final metrics of finished runs, drawn as PNGs next to a report.json.

What a run leaves (Ray Train V2 writes no result.json or progress.csv): under
`<storage_path>/<run_name>/`, `checkpoint_manager_snapshot.json` and the kept `checkpoint_*/` folders,
each holding the `metrics.json` rank 0 reported with it (`student_trainer.train._report`), and any
TensorBoard event files (`events.out.tfevents.*`, per-step scalars), and the evaluation curve of a run
trained with `eval_every_steps` (`eval_curve.json`, `student_trainer.curves`). All are read; a step
found in several takes the event file's values over the checkpoint's, and the curve's (exact where
TensorBoard keeps float32) over both. Evaluation figures (zero-shot top-1/top-5,
retrieval R@1) come from the runs' metrics and curves where they hold them, and from a `report.json`
with `models` (the demo's, which also names its no-teacher `baseline`).

With a baseline that has a final zero-shot top-1 (a run's or a model's), each run's curve is read
for time-to-quality: the first evaluation at or above it, in steps, samples, training wall time and
teacher-seconds, or "never" (`time_to_quality` in report.json, `eval_curves.png`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.plots import pyplot, save_png
from student_trainer.curves import REACH_CLOCKS, final_value, first_reaching, read_curve
from student_trainer.events import BY_SAMPLES
from teacher_service.atomic_files import write_atomic

EVAL_METRICS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1")
SNAPSHOT = "checkpoint_manager_snapshot.json"
CURVES_PNG, FINALS_PNG, REPORT_JSON = "learning_curves.png", "final_metrics.png", "report.json"
EVAL_CURVES_PNG = "eval_curves.png"
CURVE_AXES = (("step", "optimizer steps"), ("samples_seen", "samples seen"), ("train_wall_s", "training time (s)"),
              ("teacher_s", "teacher-seconds"))


@dataclass
class RunHistory:
    """One run's reported metrics by step (numbers only), oldest first."""

    name: str
    path: Path
    points: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)  # of the latest checkpoint, when `kd report --val-shards` ran it
    curve: list[dict] = field(default_factory=list)  # the evaluation curve (`eval_every_steps`), oldest first

    def final(self) -> dict:
        """The last value of every metric (a metric absent from the last report keeps its last value),
        and the latest checkpoint's evaluation on top."""
        out: dict = {}
        for p in self.points:
            out.update(p)
        return {**out, **self.evaluation}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        pts = [(p["step"], p[key]) for p in self.points if key in p]
        return [s for s, _ in pts], [v for _, v in pts]

    def loss_keys(self) -> list[str]:
        keys = {k for p in self.points for k in p if k == "loss" or k.endswith("_loss")}
        return sorted(keys, key=lambda k: (k != "loss", k))


def _numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _checkpoint_points(run_dir: Path) -> list[dict]:
    """Reports that came with a checkpoint: the snapshot's list and each kept checkpoint's metrics.json."""
    found = []
    snapshot = run_dir / SNAPSHOT
    if snapshot.is_file():
        doc = json.loads(snapshot.read_text())
        found += [r.get("metrics") or {} for r in doc.get("checkpoint_results", [])]
    found += [json.loads(p.read_text()) for p in sorted(run_dir.glob("checkpoint_*/metrics.json"))]
    return [_numbers(m) for m in found if "step" in m]


def _event_points(run_dir: Path) -> list[dict]:
    """Per-step scalars of TensorBoard event files under the run; a tag `train/loss` becomes `loss`."""
    files = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not files:
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(f"{BY_SAMPLES}/"):  # drawn against samples seen: not a step's value
                continue
            for e in acc.Scalars(tag):
                by_step.setdefault(int(e.step), {"step": float(e.step)})[tag.rsplit("/", 1)[-1]] = float(e.value)
    return list(by_step.values())


def load_run(run_dir: Path) -> RunHistory:
    """The run's metrics by step from what Ray Train and the run left in `run_dir`."""
    by_step: dict[float, dict] = {}
    curve = read_curve(run_dir)
    for p in _checkpoint_points(run_dir) + _event_points(run_dir) + [_numbers(c) for c in curve]:
        by_step.setdefault(p["step"], {}).update(p)
    return RunHistory(run_dir.name, run_dir, [by_step[s] for s in sorted(by_step)], curve=curve)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest kept checkpoint: the snapshot's latest, else the last `checkpoint_<time>` name."""
    snapshot = run_dir / SNAPSHOT
    if snapshot.is_file():
        latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest and (run_dir / latest).is_dir():
            return run_dir / latest
    kept = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return kept[-1] if kept else None


def evaluate_runs(runs: list[RunHistory], val_shards: str, limit: int | None = None) -> None:
    """Zero-shot and retrieval figures of each run's latest checkpoint on `val_shards` (runs report
    none while training; a sweep's bars then compare runs on the same split)."""
    from student_trainer.evaluate import evaluate_checkpoint

    for run in runs:
        checkpoint = latest_checkpoint(run.path)
        if checkpoint is not None:
            run.evaluation = _numbers(evaluate_checkpoint(checkpoint, val_shards, limit=limit))


def is_run_dir(path: Path) -> bool:
    return (path / SNAPSHOT).is_file() or any(path.glob("checkpoint_*")) or any(path.glob("events.out.tfevents.*"))


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders named by `paths`: a run folder itself, or a folder holding runs (a storage path,
    or a demo workdir with `runs/`)."""
    runs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        if is_run_dir(path):
            runs.append(path)
            continue
        inner = path / "runs" if (path / "runs").is_dir() else path
        children = sorted(c for c in inner.iterdir() if c.is_dir() and is_run_dir(c))
        if not children:
            raise ValueError(f"no runs under {path}: expected {SNAPSHOT}, checkpoint_* or TensorBoard event files")
        runs += children
    return runs


def known_models(paths: list[Path]) -> tuple[dict, str | None]:
    """Evaluated models and the baseline's name from any report.json with `models` among `paths`."""
    models: dict = {}
    baseline = None
    for path in paths:
        report = path / REPORT_JSON
        if report.is_file():
            doc = json.loads(report.read_text())
            models.update(doc.get("models") or {})
            baseline = doc.get("baseline") or baseline
    return models, baseline


def final_entries(runs: list[RunHistory], models: dict) -> dict[str, dict]:
    """Name -> final numeric metrics, evaluated models (a demo's report.json) first, then the runs."""
    return {**{name: _numbers(m) for name, m in models.items()}, **{r.name: r.final() for r in runs}}


def plot_curves(runs: list[RunHistory], path: Path) -> Path | None:
    """One column per run (side by side, shared y per row): losses vs step, then evaluation figures
    vs step where a run reported them. None when no run has a reported step."""
    runs = [r for r in runs if r.points]
    if not runs:
        return None
    rows = [("loss", None)] + ([("evaluation", EVAL_METRICS)]
                               if any(r.series(k)[0] for r in runs for k in EVAL_METRICS) else [])
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(rows), len(runs), figsize=(4.2 * len(runs), 3.2 * len(rows)),
                             sharey="row", squeeze=False)
    for col, run in enumerate(runs):
        for row, (title, keys) in enumerate(rows):
            ax = axes[row][col]
            for key in keys or run.loss_keys():
                steps, values = run.series(key)
                if steps:
                    ax.plot(steps, values, marker="o", markersize=3, label=key)
            ax.set_title(f"{run.name}: {title}", fontsize=8)
            ax.set_xlabel("step")
            lo, hi = ax.get_xlim()
            if hi - lo < 2:  # one report: widen the axis so its ticks are whole steps
                ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            ax.legend(fontsize=6)
    return save_png(fig, path)


def plot_finals(entries: dict[str, dict], baseline: str | None, path: Path) -> Path | None:
    """Grouped bars of the evaluation figures per model/run, the baseline hatched; without any
    evaluation figure, the runs' final training loss. None when there is nothing to draw."""
    metrics = [m for m in EVAL_METRICS if any(m in e for e in entries.values())] or ["loss"]
    entries = {n: e for n, e in entries.items() if any(m in e for m in metrics)}
    if not entries:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) * max(1, len(entries)) / 2), 4))
    width = 0.8 / len(entries)
    for i, (name, final) in enumerate(entries.items()):
        xs = [j + i * width for j in range(len(metrics))]
        is_base = name == baseline
        bars = ax.bar(xs, [final.get(m, 0.0) for m in metrics], width,
                      label=f"{name} (baseline)" if is_base else name,
                      hatch="//" if is_base else None, color="lightgrey" if is_base else None, edgecolor="black")
        ax.bar_label(bars, fmt="%.3f", fontsize=6)
    ax.set_xticks([j + width * (len(entries) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_title("final metrics" + (f" (baseline: {baseline})" if baseline in entries else ""))
    ax.legend(fontsize=7)
    return save_png(fig, path)


def baseline_final(runs: list[RunHistory], entries: dict[str, dict], baseline: str | None) -> float | None:
    """The baseline's final zero-shot top-1: its curve's last point, else its final metrics."""
    run = next((r for r in runs if r.name == baseline), None)
    value = final_value(run.curve) if run is not None else None
    if value is None and baseline in entries:
        value = entries[baseline].get("zero_shot_top1")
    return value


def time_to_quality(runs: list[RunHistory], threshold: float) -> dict[str, dict | None]:
    """Each run with a curve: the clocks of its first evaluation at or above `threshold`, None for never."""
    out: dict[str, dict | None] = {}
    for run in runs:
        if run.curve:
            point = first_reaching(run.curve, threshold)
            out[run.name] = None if point is None else {k: point.get(k) for k in REACH_CLOCKS}
    return out


def plot_eval_curves(runs: list[RunHistory], threshold: float | None, path: Path) -> Path | None:
    """Zero-shot top-1 of every run's curve against steps, samples seen, training time and
    teacher-seconds (one panel each, the runs overlaid), the baseline's final as a dashed line.
    None when no run has a curve."""
    runs = [r for r in runs if r.curve]
    if not runs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVE_AXES), figsize=(4.0 * len(CURVE_AXES), 3.4), sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], CURVE_AXES):
        for run in runs:
            pts = [(p[key], p["zero_shot_top1"]) for p in run.curve if key in p and "zero_shot_top1" in p]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=run.name)
        if threshold is not None:
            ax.axhline(threshold, linestyle="--", color="grey", linewidth=1, label="baseline final")
        ax.set_xlabel(label)
    axes[0][0].set_ylabel("zero-shot top-1")
    axes[0][0].legend(fontsize=6)
    return save_png(fig, path)


def write_report(paths: list[Path], out: Path, baseline: str | None = None, val_shards: str | None = None,
                 eval_limit: int | None = None) -> dict:
    """Draw the runs found under `paths` into `out` and record them in `out/report.json`, keeping
    what a report.json there already says (the demo's models, baseline and gains). With
    `val_shards`, each run's latest checkpoint is evaluated first."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    runs = [load_run(p) for p in find_runs(paths)]
    if val_shards:
        evaluate_runs(runs, val_shards, eval_limit)
    models, found_baseline = known_models([*paths, out])
    baseline = baseline or found_baseline
    existing = json.loads((out / REPORT_JSON).read_text()) if (out / REPORT_JSON).is_file() else {}
    entries = final_entries(runs, models)
    threshold = baseline_final(runs, entries, baseline) if baseline else None
    drawn = [plot_curves(runs, out / CURVES_PNG), plot_finals(entries, baseline, out / FINALS_PNG),
             plot_eval_curves(runs, threshold, out / EVAL_CURVES_PNG)]
    doc = {**existing, "runs": {r.name: {"path": str(r.path), "reports": len(r.points), "final": r.final()}
                                for r in runs},
           "plots": [p.name for p in drawn if p is not None]}
    if baseline:
        doc["baseline"] = baseline
    if threshold is not None and any(r.curve for r in runs):
        doc["time_to_quality"] = {"baseline": baseline, "zero_shot_top1": threshold,
                                  "runs": time_to_quality(runs, threshold)}
    write_atomic(out / REPORT_JSON, json.dumps(doc, indent=2, default=str))
    return doc


def write_sweep_report(configs: list) -> Path | None:
    """`kd sweep`'s pictures: the runs' curves and final metrics in `<storage>/sweep-<time>/` (local
    storage only; a cloud storage path is left to `kd report` on a machine that mounts it)."""
    dirs = [Path(c.storage_path).expanduser().resolve() / c.run_name for c in configs if "://" not in c.storage_path]
    dirs = [d for d in dirs if d.is_dir() and is_run_dir(d)]
    if not dirs:
        return None
    out = dirs[0].parent / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        doc = write_report(dirs, out)
    except (OSError, ValueError, ImportError) as exc:  # pictures are a by-product: the runs succeeded
        print(f"[kd sweep] no pictures: {exc!r} (try `kd report {' '.join(map(str, dirs))}`)", flush=True)
        return None
    print(f"[kd sweep] learning curves and final metrics: {', '.join(str(out / p) for p in doc['plots'])}", flush=True)
    return out
