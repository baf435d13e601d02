"""Every distillation method in the real training step and loop.

- `train_step` with k micro-batches of b gives the same weights as one batch of k·b (all losses,
  MFD masks included), in one process and under 2-rank gloo DDP against the global batch;
- Embed-KD centroids from `teacher_service.cache.centroids` equal a direct per-class mean, through an
  inline engine and a (fake) Serve handle alike;
- one Ray Train run (inline teacher, 2 DDP workers, accum_steps=2) with every method at once
  reports a finite value per method and checkpoints the teacher's class centroids.
"""
from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from student_trainer.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.factory import create_student, create_tokenizer
from student_trainer.teacher.outputs import TeacherOutputs
from student_trainer.losses import DEFAULT_WEIGHTS, build_losses
from student_trainer.train import (
    DistillModule,
    optimizer_steps_per_epoch,
    param_groups,
    teacher_image_embedder,
    train_step,
)
from teacher_service.cache.centroids import class_centroids
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.contract.preprocess import preprocess_spec, to_model_input
from tiny_models import tiny_teacher_overrides

pytestmark = pytest.mark.timeout(240)

DT, CLASSES, B, K = 48, 3, 4, 2
CLIP_TASK_METHODS = ("clip", "kl", "crd", "fd", "mfd", "icl", "gd", "afd", "embed_kd")
TINY_TEACHER = tiny_teacher_overrides(DT)
TEACHER_CFG = TeacherConfig(model="ViT-B-32", overrides=TINY_TEACHER, torch_threads=1,
                            serving=ServingConfig(app_name="kd-methods-test", num_cpus=0.5, max_batch_size=64))


# --------------------------------------------------------------------------- in-process steps
def _data(rows: int, seed: int = 0, siglip_teacher: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    unit = lambda n, d: torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    teacher = {"image_features": unit(rows, DT), "text_features": unit(rows, DT),
               "logit_scale": torch.tensor(50.0, dtype=torch.float64)}
    if siglip_teacher:
        teacher["logit_bias"] = torch.tensor(-8.0, dtype=torch.float64)
    return {
        "images": torch.randint(0, 256, (rows, 32, 32, 3), generator=g, dtype=torch.uint8),
        "tokens": torch.as_tensor(np.asarray(tokenizer([f"a photo of the digit {i % 10}." for i in range(rows)]))),
        "labels": torch.arange(rows) % CLASSES,
        "teacher": teacher,
        "centroids": torch.randn(CLASSES, DT, generator=g, dtype=torch.float64),
    }


def _module(methods: tuple[str, ...], data: dict, overrides: dict | None = None) -> DistillModule:
    torch.manual_seed(0)
    student = create_student(ModelConfig(name="digits-student", overrides=overrides or {}))
    weights = {m: DEFAULT_WEIGHTS[m] for m in methods}
    losses = build_losses(weights, student_dim=64, teacher_dim=DT,
                          options={"num_classes": CLASSES, "class_centroids": data["centroids"]})
    return DistillModule(student, losses, preprocess_spec(student)).double()


def _optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(module, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)


def _micro(data: dict, rows: slice, parts: int) -> list:
    start, stop = rows.start, rows.stop
    size = (stop - start) // parts
    return [(data["images"][a:a + size], data["tokens"][a:a + size], data["labels"][a:a + size])
            for a in range(start, stop, size)]


def _teacher(data: dict, rows: slice) -> dict:
    return {k: (v[rows] if v.dim() else v) for k, v in data["teacher"].items()}


def _steps(module, data, rows: slice, parts: int, seeds=(11, 12)) -> list[dict]:
    """Two optimizer steps on the same rows (the second exercises AdamW's moments)."""
    optimizer = _optimizer(module)
    return [train_step(module, optimizer, _micro(data, rows, parts), _teacher(data, rows), seed=s) for s in seeds]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("methods, overrides, siglip_teacher", [
    (CLIP_TASK_METHODS, None, False),
    (("siglip", "kl"), {"init_logit_bias": -10.0}, True),  # SigLIP task loss, KL from a SigLIP teacher
], ids=["clip-all-kd", "siglip-kl"])
def test_accumulated_step_equals_one_big_batch(methods, overrides, siglip_teacher):
    data = _data(K * B, siglip_teacher=siglip_teacher)
    big = _module(methods, data, overrides)
    accumulated = copy.deepcopy(big)
    initial = copy.deepcopy(big.state_dict())
    rows = slice(0, K * B)
    big_values = _steps(big, data, rows, parts=1)
    accum_values = _steps(accumulated, data, rows, parts=K)

    _assert_same_weights(accumulated, big)
    for v_big, v_acc in zip(big_values, accum_values):
        assert set(v_big) == {f"{m}_loss" for m in methods} | {"loss"} == set(v_acc)
        for key in v_big:
            torch.testing.assert_close(v_acc[key], v_big[key], rtol=1e-9, atol=1e-11, msg=key)
            assert math.isfinite(float(v_big[key]))
        torch.testing.assert_close(v_big["loss"], sum(v for k, v in v_big.items() if k != "loss"))
    changed = [k for k, v in big.state_dict().items() if not torch.equal(v, initial[k])]
    assert "student.text_projection" in changed and "student.visual.proj" in changed
    for m in methods:  # every method's learnable heads trained (FD/MFD/ICL/GD/AFD share P)
        if any(True for _ in big.losses.losses[m].parameters()):
            assert any(k.startswith(f"losses.losses.{m}.") for k in changed), m

    if "mfd" in methods:  # the masks are in effect: other mask seeds, other update
        other = _module(methods, data, overrides)
        _steps(other, data, rows, parts=K, seeds=(13, 14))
        assert not torch.allclose(other.state_dict()["student.visual.proj"], big.state_dict()["student.visual.proj"])


def test_naive_accumulation_would_differ():
    """Control: summing per-micro-batch losses (what exactness rules out) changes the update."""
    methods = ("clip", "kl")
    data = _data(K * B)
    exact, naive = _module(methods, data), _module(methods, data)
    _steps(exact, data, slice(0, K * B), parts=K, seeds=(1,))
    optimizer = _optimizer(naive)
    optimizer.zero_grad()
    for part, rows in zip(_micro(data, slice(0, K * B), K), (slice(0, B), slice(B, 2 * B))):
        out = naive(*part, _teacher(data, rows))
        (sum(out.values()) / K).backward()
    optimizer.step()
    assert not torch.allclose(exact.state_dict()["student.text_projection"],
                              naive.state_dict()["student.text_projection"], atol=1e-8)


def test_merge_teacher_outputs_and_step_counts(tmp_path):
    from dataclasses import replace

    a = TeacherOutputs(np.ones((2, 3), np.float16), np.zeros((2, 3), np.float16), 5.0, None, "f")
    b = replace(a, image_features=np.full((2, 3), 2, np.float16))
    merged = TeacherOutputs.merge([a, b])
    assert merged.image_features.shape == (4, 3) and merged.image_features[2, 0] == 2 and len(merged) == 4
    assert merged.text_features.shape == (4, 3) and merged.logit_scale == 5.0
    assert TeacherOutputs.merge([None, None]) is None and TeacherOutputs.merge([a]) is a
    with pytest.raises(ValueError, match="some micro-batches"):
        TeacherOutputs.merge([a, None])
    with pytest.raises(ValueError, match="different teachers"):
        TeacherOutputs.merge([a, replace(b, fingerprint="g")])
    tensors = merged.to_tensors("cpu")
    assert tensors["image_features"].dtype == torch.float32 and "logit_bias" not in tensors
    tensors["image_features"] += 1  # a copy: the (read-only, shared) numpy rows are untouched
    assert merged.image_features[0, 0] == 1

    from student_trainer.data.write_shards import write_digits_shards

    write_digits_shards(tmp_path, image_size=8, samples_per_shard=400)
    shards = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    cfg = TrainConfig(data=DataConfig(train_shards=str(tmp_path / "train"), batch_size=16), accum_steps=3)
    from student_trainer.data.batches import steps_per_epoch

    batches = steps_per_epoch(shards, world_size=2, batch_size=16)
    assert optimizer_steps_per_epoch(cfg, shards, 2) == batches // 3
    cfg.max_steps_per_epoch = 2
    assert optimizer_steps_per_epoch(cfg, shards, 2) == 2
    cfg.accum_steps = batches + 1
    with pytest.raises(ValueError, match="accum_steps"):
        optimizer_steps_per_epoch(cfg, shards, 2)


# --------------------------------------------------------------------------- 2-rank DDP
DDP_METHODS = tuple(m for m in CLIP_TASK_METHODS if m != "mfd")  # per-rank mask seeds differ by design


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _data(world * K * B)
        rows = slice(rank * K * B, (rank + 1) * K * B)
        results = {}
        for parts in (K, 1):  # accumulated (no_sync + average) and the plain DDP step
            module = _module(DDP_METHODS, data)
            ddp = torch.nn.parallel.DistributedDataParallel(module)
            optimizer = _optimizer(module)
            train_step(module, optimizer, _micro(data, rows, parts), _teacher(data, rows), seed=3, ddp=ddp)
            results[parts] = module.state_dict()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned DDP ranks
def test_ddp_accumulation_equals_the_global_batch(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    data = _data(world * K * B)
    reference = _module(DDP_METHODS, data)
    train_step(reference, _optimizer(reference), _micro(data, slice(0, world * K * B), 1),
               _teacher(data, slice(0, world * K * B)), seed=3)
    expected = reference.state_dict()
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for parts, state in results.items():
            for key in expected:
                torch.testing.assert_close(state[key], expected[key], rtol=1e-9, atol=1e-11,
                                           msg=f"rank {rank}, {parts} micro-batches: {key}")


# --------------------------------------------------------------------------- centroids
def test_class_centroids_mean_of_n_drawn_per_class():
    """N samples per class drawn with a seed (the paper's random N, not the first N in file order),
    independent of reading order; the centroid is the plain mean of their embeddings."""
    import hashlib

    from teacher_service.cache.centroids import draw_per_class

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    labels = np.array([i % 4 for i in range(29)] + [-1])  # one unlabeled sample
    keys = [f"sample-{i:03d}" for i in range(30)]
    table = rng.normal(size=(256, 5)).astype(np.float32)
    embed = lambda x: table[x[:, 0, 0, 0]]  # a fake teacher: embedding looked up from one pixel
    calls = []

    def counted(x):
        calls.append(len(x))
        return embed(x).astype(np.float16)

    picked = draw_per_class(keys, labels, 4, per_class=3, seed=7)
    # restated: per class, the 3 keys first in the order of sha256(seed, key)
    rank = lambda i: hashlib.sha256(f"7\x00{keys[i]}".encode()).digest()[:8][::-1]
    expected = sorted(i for c in range(4) for i in sorted(np.flatnonzero(labels == c), key=rank)[:3])
    assert picked.tolist() == expected
    order = rng.permutation(30)
    reordered = draw_per_class([keys[i] for i in order], labels[order], 4, per_class=3, seed=7)
    assert sorted(order[reordered].tolist()) == expected  # the draw does not depend on shard order
    assert draw_per_class(keys, labels, 4, per_class=3, seed=8).tolist() != expected
    assert picked.tolist() != sorted(i for c in range(4) for i in np.flatnonzero(labels == c)[:3])

    got = class_centroids(counted, images[picked], labels[picked], 4, batch_size=5)
    assert got.dtype == np.float32 and got.shape == (4, 5)
    assert sum(calls) == 12 and max(calls) <= 5  # only the chosen samples, in chunks
    for c in range(4):
        rows = [i for i in expected if labels[i] == c]
        np.testing.assert_allclose(got[c], embed(images[rows]).astype(np.float16).astype(np.float32).mean(0),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match=r"classes without samples: \[4, 5\]"):
        draw_per_class(keys, labels, 6, per_class=3, seed=0)
    with pytest.raises(ValueError, match=r"classes without samples: \[4, 5\]"):
        class_centroids(embed, images, labels, 6)
    with pytest.raises(ValueError, match="uint8"):
        class_centroids(embed, images.astype(np.float32), labels, 4)


class _FakeRemote:
    """A RemoteTeacher's surface: .handle.embed.remote(request).result(timeout_s) and .cfg; it answers
    in the request's answer dtype, int8 when it names none (a pool whose serving.answer_dtype is int8)."""

    def __init__(self, engine):
        outer = self

        class _Pending:
            def __init__(self, request):
                self.request = request

            def result(self, timeout_s=None):
                from teacher_service.contract.answer_codec import encode_response

                outer.timeouts.append(timeout_s)
                return encode_response(engine.embed(self.request), self.request.answer_dtype or "int8")

        class _Method:
            def remote(self, request):
                return _Pending(request)

        self.handle = type("H", (), {"embed": _Method()})()
        self.cfg = TeacherSourceConfig(mode="remote", timeout_s=7.0)
        self.timeouts: list = []


def test_teacher_image_embedder_inline_and_remote():
    from student_trainer.teacher.sources import InlineTeacher, NoTeacher

    inline = InlineTeacher(TeacherSourceConfig(mode="inline", teacher=TEACHER_CFG), run="t")
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    teacher = inline.engine.teacher
    direct = teacher.encode_tensors(to_model_input(images, teacher.spec, device=teacher.device), None)["image_features"]
    via_inline = teacher_image_embedder(inline, "t")(images)
    remote = _FakeRemote(inline.engine)
    via_remote = teacher_image_embedder(remote, "t")(images)
    assert via_inline.shape == (6, DT)
    np.testing.assert_array_equal(via_inline, np.asarray(direct))
    np.testing.assert_array_equal(via_remote, via_inline)  # centroid rows are asked in fp16 whatever the default
    assert remote.timeouts == [7.0]
    with pytest.raises(ValueError, match="inline, remote or hybrid teacher"):
        teacher_image_embedder(NoTeacher(), "t")


# --------------------------------------------------------------------------- the Ray Train loop
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, image_size=32, samples_per_shard=100)
    return out


def test_every_method_trains_in_the_ray_loop(shards, tmp_path, ray_cluster):
    """clip + kl + crd + fd + mfd + icl + gd + afd + embed_kd in one DDP run, accum_steps=2: also the
    suite's run with an inline teacher (each rank its own, asked once per micro-batch)."""
    from teacher_service.model import load_teacher
    from teacher_service.shards import resolve_shards
    from student_trainer.teacher.sources import InlineTeacher
    from student_trainer.train import run_training
    from teacher_service.cache.centroids import drawn_class_views

    batch, steps, per_class = 8, 2, 4
    cfg = TrainConfig(
        run_name="all-methods", storage_path=str(tmp_path),
        model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=str(shards / "train"), image_size=32, batch_size=batch, shuffle_buffer=20),
        teacher=TeacherSourceConfig(mode="inline", teacher=TEACHER_CFG),
        losses={m: DEFAULT_WEIGHTS[m] for m in CLIP_TASK_METHODS},
        loss_options={"centroid_samples": per_class},
        optim=OptimConfig(lr=1e-3, warmup_steps=1), epochs=1, max_steps_per_epoch=steps, accum_steps=2,
        num_workers=2, cpus_per_worker=1, torch_threads=1, log_every_steps=0,
    )
    result = run_training(cfg)
    m = result.metrics
    assert m["step"] == steps and m["accum_steps"] == 2 and m["world_size"] == 2
    assert m["teacher_mode"] == "inline" and m["teacher_fingerprint"] == load_teacher(TEACHER_CFG).fingerprint
    assert m["teacher_requests"] == steps * 2 and m["teacher_samples"] == steps * 2 * batch  # per rank
    for name in CLIP_TASK_METHODS:
        assert math.isfinite(m[f"{name}_loss"]) and m[f"{name}_loss"] > 0, (name, m.get(f"{name}_loss"))
    assert m["loss"] == pytest.approx(sum(m[f"{n}_loss"] for n in CLIP_TASK_METHODS), rel=1e-4)

    # the checkpointed centroids are the teacher's mean over 4 center views per class drawn with the run's seed
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)["losses"]
    saved = state["losses.embed_kd.class_centroids"]
    inline = InlineTeacher(TeacherSourceConfig(mode="inline", teacher=TEACHER_CFG), run="check")
    _, labels, views = drawn_class_views(resolve_shards(cfg.data.train_shards), per_class, cfg.seed, 32)
    assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    expected = class_centroids(teacher_image_embedder(inline, "check"), views, labels, 10)
    assert saved.shape == (10, DT)
    np.testing.assert_allclose(saved.numpy(), expected, rtol=1e-5, atol=1e-6)
