"""Section 5: a MODEL, not a measurement, of how many teacher GPUs keep how many student GPUs busy
at real sizes, and where the network becomes the limit.

Inputs:
- published: forward GFLOPs per sample (image 224 px + text 77 tokens) from open_clip's model
  profile (`PUBLISHED_GFLOPS`); a training step costs about 3× the forward (forward + backward);
- assumed: the GPU's peak and the fraction of it reached (`ScaleModelConfig.gpu_peak_tflops`,
  `mfu`, the same for teacher and students), link speeds;
- measured here: the Serve ratio (served / direct forward, section 2), the wire bytes per sample
  (section 2's proto encoding at 224 px), and — as a variant — the ratio of the FLOP rates the
  teacher's forward and the student's training step reached on this machine's cores.
"""
from __future__ import annotations


from benchmarks.suite.common import BenchRun

SECTION = "scale"
PROFILE_SOURCE = "open_clip docs/model_profile.csv (github.com/mlfoundations/open_clip)"
# model: (image GFLOPs, text GFLOPs) per sample at 224 px / 77 tokens, from PROFILE_SOURCE
PUBLISHED_GFLOPS = {
    "ViT-S-32": (2.29, 3.38), "ViT-S-16": (9.2, 3.38), "ViT-M-16": (15.98, 5.96),
    "ViT-B-32": (8.82, 5.96), "ViT-B-16": (35.13, 5.96), "ViT-L-14": (162.03, 13.3),
    "ViT-L-14-336": (381.92, 13.3), "ViT-H-14": (334.59, 47.09), "ViT-g-14": (534.06, 47.09),
}
TRAIN_FLOPS_FACTOR = 3.0  # forward + backward ≈ 3 forwards


def published_gflops(arch: str) -> float:
    if arch not in PUBLISHED_GFLOPS:
        raise ValueError(f"scale model: no published FLOPs for {arch!r}; known: {sorted(PUBLISHED_GFLOPS)}")
    return sum(PUBLISHED_GFLOPS[arch])


def student_train_flops(run: BenchRun) -> float:
    """FLOPs of one training sample of the measured student: 3 × its counted forward (image + text)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from student_trainer.config import ModelConfig
    from student_trainer.factory import create_student

    m = run.cfg.models
    model = create_student(ModelConfig(name=m.student, overrides=dict(m.student_overrides))).eval()
    image = torch.zeros(1, 3, *model.visual.image_size) if hasattr(model.visual, "image_size") \
        else torch.zeros(1, 3, m.image_size, m.image_size)
    text = torch.ones(1, int(model.context_length), dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(image)
        model.encode_text(text)
    return TRAIN_FLOPS_FACTOR * float(counter.get_total_flops())


def measured_efficiency_ratio(run: BenchRun) -> float | None:
    """(teacher forward FLOP/s per thread) / (student training FLOP/s per thread) on this machine,
    or None when sections 1 and 2 did not both run."""
    info, direct = run.shared.get("teacher_info"), run.shared.get("teacher_direct_rate")
    student_rate = run.shared.get("none_samples_per_s")
    if not (info and direct and student_rate and info.get("flops_per_sample")):
        return None
    plan = run.plan
    teacher = direct * info["flops_per_sample"] / plan.teacher_threads
    student = student_rate * student_train_flops(run) / plan.student_threads
    run.add(SECTION, "teacher forward rate reached here (per thread)", "GFLOP/s", [teacher / 1e9], kind="derived",
            params={"threads": plan.teacher_threads}, note="section 2's direct forward × counted FLOPs")
    run.add(SECTION, "student training rate reached here (per thread)", "GFLOP/s", [student / 1e9], kind="derived",
            params={"threads": plan.student_threads}, note="section 1's `none` samples/s × 3 × counted forward FLOPs")
    return teacher / student


def run_scale(run: BenchRun) -> None:
    sc = run.cfg.scale
    serve_ratio = min(1.0, run.shared.get("serve_ratio", 1.0))
    req_bytes = run.shared.get("wire_scale", (None, None))[0]
    if req_bytes is None:
        from benchmarks.suite.pool import wire_bytes

        req_bytes = wire_bytes(64, sc.image_size, sc.context_length, sc.embed_dim)[0]
    eff = measured_efficiency_ratio(run)
    flops_t = published_gflops(sc.teacher) * 1e9
    gpu = sc.gpu_peak_tflops * 1e12 * sc.mfu
    teacher_sps = gpu / flops_t * serve_ratio
    base = {"teacher": sc.teacher, "gpu": sc.gpu_name, "peak_tflops": sc.gpu_peak_tflops, "mfu": sc.mfu,
            "serve_ratio": round(serve_ratio, 3), "flops_source": PROFILE_SOURCE}
    note = "MODEL, not a measurement: published FLOPs × assumed GPU peak and MFU × measured Serve ratio"
    run.add(SECTION, f"{sc.teacher} teacher samples/s per GPU", "samples/s", [teacher_sps], params=base,
            kind="model", note=note)
    for student in sc.students:
        _student_rows(run, student, teacher_sps, base, eff, note)
    from benchmarks.suite.pool import reference_wire_bytes

    ref_bytes = reference_wire_bytes(64, sc.image_size, sc.context_length)
    for gbps in sc.link_gbps:
        link = gbps * 1e9 / 8
        for form, per_sample in (("pixels", req_bytes), ("by reference", ref_bytes)):
            fed = link / (teacher_sps * per_sample)
            run.add(SECTION, f"{sc.teacher} teacher GPUs one {gbps:g} Gb/s NIC keeps fed ({form})", "GPUs", [fed],
                    params={**base, "link_gbps": gbps, "request_bytes_per_sample": round(per_sample)}, kind="model",
                    target=f">= {sc.gpus_per_node} (one node's GPUs)",
                    note=f"below {sc.gpus_per_node}: the network, not the GPUs, limits a {sc.gpus_per_node}-GPU "
                         "teacher node" + ("; by reference the teacher reads the shards from shared storage "
                                           "instead (its read bandwidth is not modelled)" if form != "pixels" else ""))


def _student_rows(run: BenchRun, student: str, teacher_sps: float, base: dict, eff: float | None,
                  note: str) -> None:
    sc = run.cfg.scale
    flops_t = published_gflops(sc.teacher)
    flops_s = TRAIN_FLOPS_FACTOR * published_gflops(student)
    student_sps = sc.gpu_peak_tflops * 1e12 * sc.mfu / (flops_s * 1e9)
    params = {**base, "student": student, "student_train_gflops": round(flops_s, 2),
              "teacher_gflops": round(flops_t, 2)}
    pair = f"{sc.teacher} → {student}"
    run.add(SECTION, f"{student} student samples/s per GPU", "samples/s", [student_sps], params=params, kind="model",
            note=note)
    run.add(SECTION, f"inline speed vs no teacher ({pair})", "x", [flops_s / (flops_s + flops_t)], params=params,
            kind="model", note="teacher forward on the student GPU, same MFU; OpenCLIP documents 1.5-2x slower")
    for n in sc.runs_sharing:
        per_student = teacher_sps * n / student_sps
        run.add(SECTION, f"student GPUs one teacher GPU keeps busy ({pair}, {n} run(s) sharing views)", "GPUs",
                [per_student], params={**params, "runs_sharing": n}, kind="model",
                note="runs over the same views share each forward (exactly-once coalescing)")
    if eff is not None:
        run.add(SECTION, f"student GPUs one teacher GPU keeps busy ({pair}, efficiency ratio measured here)", "GPUs",
                [teacher_sps / student_sps * eff], params={**params, "efficiency_ratio": round(eff, 3)},
                kind="model", note="variant: the teacher/student FLOP-rate ratio reached on this run's machine instead of equal MFU; "
                     "at tiny sizes it reflects per-step overheads, not the models")
    ingress = student_sps * run.shared.get("wire_scale", (0.0,))[0]
    if ingress:
        run.add(SECTION, f"{student} student GPU's upload to the teacher", "Gb/s", [ingress * 8 / 1e9], params=params,
                kind="model", note="its samples/s × request bytes per sample at 224 px")
