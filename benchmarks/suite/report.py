"""Writing a run: bench.json (every record), bench.md (tables), PNG plots (when matplotlib is
installed: `pip install -e '.[bench]'`; without it the JSON and Markdown are still written and the
report says the plots were skipped). Every file is written atomically."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cluster.plots import pyplot, save_png
from teacher_service.atomic_files import write_atomic

from benchmarks.suite.records import Record, finite_json

TITLES = {
    "students": "1. Student side, by teacher mode",
    "pool": "2. Teacher pool",
    "multi": "3. Several runs on one pool",
    "cache": "4. Embedding cache",
    "scale": "5. Scale model (a MODEL from published FLOPs and assumptions, not a measurement)",
}
ANCHORS = {
    "students": "Anchors: OpenCLIP documents inline distillation as 1.5-2x slower than plain training "
                "(ratio 0.50-0.67); PaddlePaddle EDL's served teacher reached 0.83 of pure training against "
                "0.36 inline; CLIP-Embed-KD reports 9x less memory and 8x less time. Targets: remote >= 0.95, "
                "hybrid (cold) >= 0.90, cache >= 0.98 of `none`; student memory in remote and cache within 5 % of `none`.",
    "pool": "Target: Serve overhead <= 10 % (served / direct >= 0.90 at the same batch size).",
}


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("flops_source",))


def markdown(doc: dict, records: list[Record]) -> str:
    m = doc["machine"]
    lines = [f"# kd bench — preset `{doc['preset']}`", "",
             f"- command: `{doc['command']}`", f"- machine: {m['summary']}",
             (f"- started {doc['started']}, finished {doc['finished']} ({doc['wall_s']:.0f} s); load average "
             f"(1, 5, 15 min) at start and end: {m['load_average']}"),
             f"- architectures: {doc['architectures']}", f"- cores: {doc['core_plan']['note']}",
             (f"- repeats: {doc['repeats']}; every figure is the median over repeats with min..max and the "
             "quartiles, never a best run"), ""]
    if doc["preset"] == "smoke" or doc["preset"].endswith("-smoke-form"):
        lines += ["**Smoke run: tiny sizes that prove every section runs. Its figures mean nothing.**", ""]
    by_section: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_section[r.section].append(r)
    for section, title in TITLES.items():
        status = doc["sections"].get(section, {})
        lines += [f"## {title}", ""]
        if section in ANCHORS:
            lines += [ANCHORS[section], ""]
        if status.get("error"):
            lines += [f"Failed: `{status['error']}`", ""]
        if not by_section.get(section):
            lines += [status.get("skipped", "no records"), ""]
            continue
        lines += ["| figure | median | min..max | q1..q3 | n | unit | kind | target | parameters |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in by_section[section]:
            s = r.summary()
            lines.append(f"| {r.name} | {_fmt(s['median'])} | {_fmt(s['min'])}..{_fmt(s['max'])} | "
                         f"{_fmt(s['q1'])}..{_fmt(s['q3'])} | {len(r.values)} | {r.unit} | {r.kind} | "
                         f"{r.target or ''} | {_params(r.params)} |")
        notes: dict[str, str] = {}
        for r in by_section[section]:
            if r.note:
                notes.setdefault(r.note, r.name.split(" (")[0])
        lines += [""] + [f"- {name}: {note}" for note, name in notes.items()] + [""]
    plots = doc.get("plots")
    lines += ["## Plots", "", *([f"![{p}]({p})" for p in plots] if plots else [doc.get("plots_skipped", "none")]), ""]
    return "\n".join(lines)


def _series(records: list[Record], section: str, prefix: str) -> list[Record]:
    return [r for r in records if r.section == section and r.name.startswith(prefix)]


def plots(records: list[Record], out: Path, stem: str) -> tuple[list[str], str | None]:
    """PNG files written (names relative to `out`), or ([], why they were skipped)."""
    try:
        plt = pyplot()
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"
    written = []
    for name, draw in (("students", _plot_students), ("pool", _plot_pool), ("multi", _plot_multi),
                       ("cache", _plot_cache)):
        fig, ax = plt.subplots(figsize=(7, 4))
        if not draw(records, ax):
            plt.close(fig)
            continue
        written.append(save_png(fig, out / f"{stem}_{name}.png").name)
    return written, None


def _bars(ax, recs: list[Record], label) -> bool:
    if not recs:
        return False
    meds = [r.median for r in recs]
    err = [[m - min(r.values) for m, r in zip(meds, recs)], [max(r.values) - m for m, r in zip(meds, recs)]]
    ax.bar([label(r) for r in recs], meds, yerr=err, capsize=4)
    ax.set_ylabel(recs[0].unit)
    return True


def _plot_students(records: list[Record], ax) -> bool:
    ok = _bars(ax, _series(records, "students", "samples/s ("), lambda r: r.params["mode"])
    ax.set_title("student samples/s by teacher mode (median, min..max)")
    return ok


def _plot_pool(records: list[Record], ax) -> bool:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in _series(records, "pool", "direct forward"):
        lines["direct forward"].append((r.params["batch_size"], r.median))
    for r in _series(records, "pool", "served embeddings"):
        lines[f"served, {r.params['replicas']} replica(s)"].append((r.params["batch_size"], r.median))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (samples per forward)")
    ax.set_ylabel("embeddings/s")
    ax.set_title("teacher pool throughput")
    ax.legend()
    return bool(lines)


def _plot_multi(records: list[Record], ax) -> bool:
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for what in ("total samples/s", "per-run samples/s"):
        for r in _series(records, "multi", what):
            lines[f"{what}, {r.params['layout']}"].append((r.params["runs"], r.median))
    for label, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("concurrent runs on one pool")
    ax.set_ylabel("samples/s")
    ax.set_title("several runs, one teacher pool")
    ax.legend(fontsize=7)
    return bool(lines)


def _plot_cache(records: list[Record], ax) -> bool:
    recs = [r for r in records if r.section == "cache" and r.unit == "rows/s"]
    recs += [r for r in records if r.section == "pool" and r.name.startswith("direct forward")][-1:]
    ok = _bars(ax, recs, lambda r: r.name.replace(" rows/s", "").replace("direct forward embeddings/s", "teacher"))
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=75, labelsize=6)
    ax.set_title("cache reads vs the live teacher (rows/s, log)")
    return ok


def write_outputs(doc: dict, records: list[Record], out: Path, stem: str = "bench") -> dict[str, Path]:
    """bench.json, bench.md and the plots under `out`; returns the paths written."""
    doc["plots"], skipped = plots(records, out, stem)
    if skipped:
        doc["plots_skipped"] = skipped
    doc["records"] = [r.to_dict() for r in records]
    paths = {"json": write_atomic(out / f"{stem}.json", finite_json(doc)),
             "md": write_atomic(out / f"{stem}.md", markdown(doc, records))}
    return {**paths, **{p: out / p for p in doc["plots"]}}
