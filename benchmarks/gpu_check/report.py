"""The report of a GPU check: every section's JSON gathered into `gpu_check.json`, the tables in
`gpu_check.md`, and the same tables printed. A section that never wrote its JSON shows as not
finished, with the exit code `gpu_check.sh` recorded for it (124/137: its timeout)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.suite.records import finite_json, now_iso
from teacher_service.atomic_files import write_atomic

from benchmarks.gpu_check.config import SECTIONS
from benchmarks.gpu_check.run import section_path

REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"
TIMED_OUT = (124, 137)


def load_section(out: Path, name: str) -> dict[str, Any]:
    path = section_path(out, name)
    if path.is_file():
        return json.loads(path.read_text())
    rc_file = path.with_suffix(".rc")
    if rc_file.is_file():
        rc = int(rc_file.read_text().strip() or -1)
        why = "timed out" if rc in TIMED_OUT else f"exited {rc} without a result"
        return {"section": name, "status": "did not finish", "exit_code": rc, "error": why}
    return {"section": name, "status": "not run"}


def combine(out: Path) -> dict[str, Any]:
    """One document: machine, sections, every check with its section, and the verdict: passed
    when no section failed or did not finish and every enforced check passed; incomplete when a
    section did not run."""
    sections = {name: load_section(out, name) for name in SECTIONS}
    checks = [{"section": name, **c} for name, s in sections.items() for c in s.get("checks", [])]
    broken = [n for n, s in sections.items() if s["status"] in ("error", "did not finish")]
    failed = [c for c in checks if c.get("enforced", True) and not c["passed"]]
    missing = [n for n, s in sections.items() if s["status"] == "not run"]
    verdict = "FAILED" if broken or failed else ("INCOMPLETE" if missing else "PASSED")
    machine = sections["machine"]
    dry = any(s.get("dry_run") for s in sections.values())
    return {"check": "GPU check (issue 31)", "dry_run": dry, "written": now_iso(),
            "machine": machine.get("summary", "unknown (machine section did not run)"),
            "gpu": machine.get("gpu"), "verdict": verdict, "passed": verdict == "PASSED",
            "broken_sections": broken, "failed_checks": [c["name"] for c in failed], "not_run": missing,
            "sections": sections, "checks": checks}


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows], ""]


def teacher_lines(s: dict) -> list[str]:
    rows = [[p["precision"], p["batch_size"], p["direct"], p["served"], p["ratio"], p["mean_forward_samples"]]
            for p in s.get("points", [])]
    peaks = ", ".join(f"{k} {_fmt(v)} MB" for k, v in s.get("gpu_peak_mb", {}).items())
    return _table(["precision", "batch", "direct samples/s", "served samples/s", "served/direct",
                   "mean forward size"], rows) + ([f"GPU peak (torch max allocated): {peaks}", ""] if peaks else [])


def student_lines(s: dict) -> list[str]:
    rows = []
    for mode, r in s.get("modes", {}).items():
        prof, smi = r.get("profile_ms", {}), r.get("nvidia_smi", {})
        by_role = {p["role"]: p["used_mib"] for p in smi.get("processes", [])}
        rows.append([mode, r["samples_per_s"], r.get("ratio_to_none"), prof.get("data"), prof.get("teacher_wait"),
                     prof.get("compute"), r.get("student_gpu_peak_mb"), by_role.get("student"),
                     by_role.get("teacher"), r.get("pool_forward_s")])
    lines = _table(["mode", "samples/s", "x none", "data ms/step", "teacher wait ms/step", "compute ms/step",
                    "student GPU peak MB (torch)", "student MiB (nvidia-smi)", "teacher MiB (nvidia-smi)",
                    "pool forward s"], rows)
    remote = s.get("modes", {}).get("remote", {})
    return lines + [f"Teacher replica GPU peak (torch): {_fmt(s.get('teacher_gpu_peak_mb'))} MB; remote / none "
                    f"with the pool's forward time taken out (separate-GPU estimate): "
                    f"{_fmt(remote.get('separate_gpu_estimate_ratio'))}", ""]


def loss_lines(s: dict) -> list[str]:
    losses = s.get("losses", {})
    modes = [m for m in next(iter(losses.values()), {}) if m != "value_cpu_fp32"]
    rows = [[name, *[row[m] for m in modes]] for name, row in losses.items()]
    return [f"Relative error on {s.get('device')} against CPU fp32 ({s.get('error', '')}):", ""] + \
        _table(["loss", *modes], rows)


def summary_lines(doc: dict) -> list[str]:
    """The tables: sections, teacher, students, losses, checks, verdict."""
    secs = doc["sections"]
    lines = [f"GPU check{' (DRY RUN: CPU, tiny shapes; figures mean nothing)' if doc['dry_run'] else ''}: "
             f"{doc['machine']}", ""]
    lines += _table(["section", "status", "wall s", "note"],
                    [[n, s["status"], s.get("wall_s"), s.get("skipped") or s.get("error") or ""]
                     for n, s in secs.items()])
    for name, title, body in (("teacher", "Teacher forward", teacher_lines), ("students", "Student by mode (AMP)",
                              student_lines), ("losses", "Losses", loss_lines)):
        if secs[name]["status"] == "ok":
            lines += [f"## {title}", ""] + body(secs[name])
    lines += ["## Checks", ""] + _table(
        ["section", "check", "value", "target", "passed", "enforced"],
        [[c["section"], c["name"], c["value"], c["target"], c["passed"], c.get("enforced", True)]
         for c in doc["checks"] if c["section"] != "losses" or not c["passed"]])
    passed_losses = sum(1 for c in doc["checks"] if c["section"] == "losses" and c["passed"])
    lines += [f"({passed_losses} passing loss checks not listed.)", "", f"RESULT: {doc['verdict']}"]
    return lines


def write_report(out: Path) -> int:
    """Write gpu_check.json and gpu_check.md under `out`, print the tables; 0 unless FAILED (a
    partial run whose sections all passed is INCOMPLETE, exit 0)."""
    out = Path(out)
    doc = combine(out)
    lines = summary_lines(doc)
    write_atomic(out / REPORT_JSON, finite_json(doc))
    write_atomic(out / REPORT_MD, "\n".join(["# " + lines[0], *lines[1:]]) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if doc["verdict"] == "FAILED" else 0
