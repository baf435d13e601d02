"""Several teachers at once (issue 17), without Ray: the config, the ensemble losses against plain
restatements written here (numpy, float64, loops), per-sample teacher choice in the multi-teacher
source (what each teacher is asked), and the provenance / resume check of a teacher set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_trainer.config import TeacherSourceConfig, TrainConfig
from student_trainer.data.batches import Batch
from student_trainer.losses import build_losses
from student_trainer.teacher.outputs import EnsembleOutputs, TeacherOutputs, merge_outputs
from student_trainer.teacher.sources import MultiTeacher, TeacherStats

# ------------------------------------------------------------------------------------- config


def _cfg(teacher: dict, **extra) -> TrainConfig:
    return TrainConfig.from_dict({"data": {"train_shards": "x/*.tar"}, "teacher": teacher, **extra})


def test_a_single_teacher_config_is_its_own_only_member():
    cfg = _cfg({"mode": "remote", "app_name": "kd-a"}).validate()
    assert cfg.teacher.members() == [cfg.teacher] and not cfg.teacher.is_ensemble
    old_yaml = {  # a run config written before teacher.sources loads as it did
        "mode": "remote", "app_name": "kd-a", "prefetch": 3}
    assert TrainConfig.from_dict({"data": {"train_shards": "x"}, "teacher": old_yaml}).teacher.prefetch == 3


def test_sources_inherit_the_teacher_fields_and_round_trip(tmp_path):
    cfg = _cfg({"mode": "remote", "prefetch": 4, "sources": [
        {"name": "big", "app_name": "kd-big", "loss_weight": 2.0},
        {"app_name": "kd-small", "timeout_s": 5.0, "labels": [1, 2]}]}).validate()
    big, small = cfg.teacher.members()
    assert (big.name, big.mode, big.app_name, big.prefetch, big.loss_weight) == ("big", "remote", "kd-big", 4, 2.0)
    assert (small.name, small.timeout_s, small.labels, small.loss_weight) == ("kd-small", 5.0, [1, 2], 1.0)
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert TrainConfig.from_yaml(path).teacher.members() == cfg.teacher.members()


@pytest.mark.parametrize("teacher, message", [
    ({"mode": "remote", "sources": [{"app_name": "a"}, {"app_name": "a"}]}, "names must differ"),
    ({"mode": "remote", "sources": [{"app_name": "a", "colour": 1}, {"app_name": "b"}]},
     r"teacher.sources\[0\].colour"),
    ({"mode": "remote", "sources": [{"app_name": "a", "mode": "sometimes"}, {"app_name": "b"}]},
     r"teacher.sources\[0\].mode 'sometimes'"),
    ({"mode": "cache", "cache_path": "c", "sources": [{"name": "a"}, {"name": "b"}]},
     r"\['a', 'b'\] share the embedding cache .*give each 'cache' teacher of it \(\['a', 'b'\]\) a cache_teacher"),
    ({"mode": "cache", "cache_path": "c",
      "sources": [{"name": "a", "cache_teacher": "f1"}, {"name": "b", "cache_teacher": "f1"}]}, "the same teacher's rows"),
    ({"mode": "hybrid", "cache_path": "c", "cache_teacher": "f1"}, "cache_teacher picks .* its app's fingerprint"),
    ({"mode": "remote", "labels": [1]}, "need several teacher.sources"),
    ({"mode": "remote", "sources": [{"app_name": "a", "loss_weight": 0}, {"app_name": "b"}]}, "loss_weight"),
    ({"mode": "remote", "sources": [{"app_name": "a", "mode": "none"}, {"app_name": "b"}]}, "other than 'none'"),
])
def test_bad_teacher_sources_are_refused_naming_them(teacher, message):
    with pytest.raises(ValueError, match=message):
        _cfg(teacher).validate()


def test_a_repeated_app_name_lists_the_teachers():
    from cluster.cli import build_parser
    from cluster.cli.train import train_config_from_args

    base = ["train", "--train-shards", "x/*.tar"]
    one = train_config_from_args(build_parser().parse_args(base + ["--teacher-mode", "remote", "--app-name", "a"]))
    assert (one.teacher.app_name, one.teacher.sources) == ("a", [])
    two = train_config_from_args(build_parser().parse_args(base + ["--app-name", "a", "--app-name", "b"]))
    assert [(m.name, m.mode, m.app_name) for m in two.teacher.members()] == [("a", "remote", "a"),
                                                                             ("b", "remote", "b")]
    assert two.losses == {"clip": 1.0, "icl": 1.0}  # a run with teachers gets the distillation recipe


# ------------------------------------------------------------------------------------- losses


def _unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for b in range(len(z)):
        e = np.exp(z[b] - z[b].max())
        out[b] = e / e.sum()
    return out


def _setup(seed: int = 0, batch: int = 6, ds: int = 8, dims=(6, 4), scales=(70.0, 60.0)):
    rng = np.random.default_rng(seed)
    student = {"image_features": _unit(rng, batch, ds), "text_features": _unit(rng, batch, ds), "logit_scale": 14.0}
    teachers = [{"image_features": _unit(rng, batch, d), "text_features": _unit(rng, batch, d), "logit_scale": s}
                for d, s in zip(dims, scales)]
    return student, teachers


def _tensors(d: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.float64) if not isinstance(v, np.ndarray) or v.dtype != bool
            else torch.tensor(v) for k, v in d.items()}


def _run(losses: dict, student, teachers, weights, dims=(6, 4), options=None, answered=None):
    ls = build_losses(losses, student_dim=8, teacher_dim=dims[0], teacher_dims=list(dims), options=options).double()
    members = [_tensors(t) for t in teachers]
    for i, mask in enumerate(answered or []):
        if mask is not None:
            members[i]["answered"] = torch.tensor(mask)
    total = sum(weights)
    out = ls(_tensors(student), {"teachers": members, "teacher_weights": [w / total for w in weights]})
    return ls, {k: float(v) for k, v in out.items()}


def _by_hand_target(student, teachers, weights, average, answered=None):
    """Per direction: the ensemble target rows and which rows count, from the formulas."""
    n = len(student["image_features"])
    answered = answered or [None] * len(teachers)
    masks = [np.ones(n, bool) if a is None else np.asarray(a) for a in answered]
    result = []
    for image_key, text_key in (("image_features", "text_features"), ("text_features", "image_features")):
        target = np.zeros((n, n))
        covered = np.zeros(n, bool)
        for b in range(n):
            who = [i for i in range(len(teachers)) if masks[i][b]]
            if not who:
                continue
            covered[b] = True
            total = sum(weights[i] for i in who)
            if average == "logits":
                z = sum(weights[i] / total * teachers[i]["logit_scale"] * teachers[i][text_key] @ teachers[i][image_key][b]
                        for i in who)
                target[b] = _softmax_rows(z[None])[0]
                continue
            for i in who:
                cols = np.flatnonzero(masks[i])
                z = teachers[i]["logit_scale"] * teachers[i][text_key][cols] @ teachers[i][image_key][b]
                e = np.exp(z - z.max())
                target[b, cols] += weights[i] / total * e / e.sum()
        result.append((target, covered))
    return result


def _student_log_probs(student):
    s = student["logit_scale"]
    img = s * student["image_features"] @ student["text_features"].T
    txt = img.T
    return [np.log(_softmax_rows(img)), np.log(_softmax_rows(txt))]


def _kl_by_hand(student, teachers, weights, average="probs", crd=False, answered=None):
    parts = []
    for (target, covered), log_q in zip(_by_hand_target(student, teachers, weights, average, answered),
                                        _student_log_probs(student)):
        rows = []
        for b in np.flatnonzero(covered):
            value = -sum(target[b, j] * log_q[b, j] for j in range(len(log_q)))
            if crd:
                value += sum(p * np.log(p) for p in target[b] if p > 0)
            rows.append(value)
        parts.append(np.mean(rows))
    return (parts[0] + parts[1]) / 2


@pytest.mark.parametrize("average", ["probs", "logits"])
def test_ensemble_kl_is_the_kl_to_the_weighted_mean_distribution(average):
    student, teachers = _setup()
    _, out = _run({"kl": 1.0, "crd": 1.0}, student, teachers, [3.0, 1.0], options={"ensemble_average": average})
    assert out["kl_loss"] == pytest.approx(_kl_by_hand(student, teachers, [0.75, 0.25], average), rel=1e-9)
    assert out["crd_loss"] == pytest.approx(_kl_by_hand(student, teachers, [0.75, 0.25], average, crd=True),
                                            rel=1e-9)


def test_ensemble_kl_of_one_teacher_weight_is_that_teachers_kl():
    """Averaging after softmax is not averaging logits: the two differ, and a lone weight gives one teacher."""
    student, teachers = _setup(seed=1)
    _, probs = _run({"kl": 1.0}, student, teachers, [1.0, 1.0])
    _, logits = _run({"kl": 1.0}, student, teachers, [1.0, 1.0], options={"ensemble_average": "logits"})
    assert probs["kl_loss"] != pytest.approx(logits["kl_loss"], rel=1e-3)
    _, nearly_one = _run({"kl": 1.0}, student, teachers, [1.0, 1e-12])
    single = build_losses({"kl": 1.0}, student_dim=8, teacher_dim=6).double()
    alone = float(single(_tensors(student), _tensors(teachers[0]))["kl_loss"])
    assert nearly_one["kl_loss"] == pytest.approx(alone, rel=1e-9)


def _head(linear: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    w, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    y = x @ w.T + b
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_feature_losses_run_per_teacher_each_with_its_own_head():
    student, teachers = _setup(seed=2)
    ls, out = _run({"fd": 2000.0, "icl": 1.0}, student, teachers, [1.0, 3.0], options={"fd_reference_dim": 512})
    fd_members, icl_members = ls.losses["fd"].members, ls.losses["icl"].members
    heads = [m.projection for m in fd_members]
    assert heads[0] is not heads[1]  # one head per teacher ...
    assert [h.image.out_features for h in heads] == [6, 4]  # ... at that teacher's width
    assert all(icl.projection is fd.projection for icl, fd in zip(icl_members, fd_members))  # shared per teacher
    fd = icl = 0.0
    for i, (w, t) in enumerate(zip([0.25, 0.75], teachers)):
        p_img, p_txt = _head(heads[i].image, student["image_features"]), _head(heads[i].text, student["text_features"])
        d = t["image_features"].shape[1]
        mse = np.mean((p_img - t["image_features"]) ** 2) + np.mean((p_txt - t["text_features"]) ** 2)
        fd += w * (d / 512) * mse
        kappa = float(icl_members[i].log_scale.exp())
        ce = lambda z: np.mean([-np.log(_softmax_rows(z)[b, b]) for b in range(len(z))])
        icl += w * (ce(kappa * p_img @ t["text_features"].T) + ce(kappa * p_txt @ t["image_features"].T)) / 2
    assert out["fd_loss"] == pytest.approx(2000.0 * fd, rel=1e-9)
    assert out["icl_loss"] == pytest.approx(icl, rel=1e-9)


def test_losses_use_only_the_teachers_that_answered_each_sample():
    student, teachers = _setup(seed=3)
    answered = [np.array([1, 1, 0, 0, 1, 0], bool), np.array([0, 1, 1, 0, 1, 0], bool)]  # rows 3, 5: nobody
    for t, mask in zip(teachers, answered):  # what the source sends for rows a teacher was not asked about
        t["image_features"][~mask] = 0
        t["text_features"][~mask] = 0
    ls, out = _run({"kl": 1.0, "fd": 512.0, "icl": 1.0}, student, teachers, [1.0, 1.0], answered=answered,
                   options={"fd_reference_dim": 512})
    assert out["kl_loss"] == pytest.approx(_kl_by_hand(student, teachers, [0.5, 0.5], answered=answered), rel=1e-9)
    fd = icl = 0.0
    for i, (t, mask) in enumerate(zip(teachers, answered)):
        head = ls.losses["fd"].members[i].projection
        rows = np.flatnonzero(mask)
        p_img = _head(head.image, student["image_features"])[rows]
        p_txt = _head(head.text, student["text_features"])[rows]
        d = t["image_features"].shape[1]
        fd += 0.5 * (d / 512) * (np.mean((p_img - t["image_features"][rows]) ** 2)
                                 + np.mean((p_txt - t["text_features"][rows]) ** 2))
        kappa = float(ls.losses["icl"].members[i].log_scale.exp())
        ce = lambda z: np.mean([-np.log(_softmax_rows(z)[b, b]) for b in range(len(z))])  # over its rows only
        icl += 0.5 * (ce(kappa * p_img @ t["text_features"][rows].T) + ce(kappa * p_txt @ t["image_features"][rows].T)) / 2
    assert out["fd_loss"] == pytest.approx(512.0 * fd, rel=1e-9)
    assert out["icl_loss"] == pytest.approx(icl, rel=1e-9)


def test_gd_and_single_teacher_kl_refuse_partial_answers():
    student, teachers = _setup(seed=4)
    with pytest.raises(ValueError, match="per-sample teacher choice"):
        _run({"gd": 1.0}, student, teachers, [1.0, 1.0], answered=[None, np.array([1, 0, 1, 0, 1, 0], bool)])
    with pytest.raises(ValueError, match="'logits' needs every teacher"):
        _run({"kl": 1.0}, student, teachers, [1.0, 1.0], options={"ensemble_average": "logits"},
             answered=[None, np.array([1, 0, 1, 0, 1, 0], bool)])


def test_gradients_flow_to_every_teachers_head_and_the_student():
    student, teachers = _setup(seed=5)
    ls = build_losses({"kl": 1.0, "fd": 2000.0, "icl": 1.0}, student_dim=8, teacher_dim=6, teacher_dims=[6, 4])
    s = {k: torch.tensor(v, dtype=torch.float32, requires_grad=k != "logit_scale") for k, v in student.items()}
    out = ls(s, {"teachers": [{k: torch.tensor(v, dtype=torch.float32) for k, v in t.items()} for t in teachers],
                 "teacher_weights": [0.5, 0.5]})
    sum(out.values()).backward()
    assert s["image_features"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ls.parameters())


# ------------------------------------------------------------------------------------- sources


class _Recording:
    """A stand-in teacher source: answers each batch with features i+1 and records what it was asked."""

    needs_app = needs_cache = can_lose_teacher = False

    def __init__(self, dim: int, fingerprint: str) -> None:
        self.embed_dim, self.asked = dim, []
        self.info = {"fingerprint": fingerprint, "model": f"m{dim}", "logit_scale": 50.0, "logit_bias": None}
        self.stats = TeacherStats()

    def stream(self, batches, view=None, eager=False):
        for batch in batches:
            self.asked.append(list(batch.keys))
            self.stats.requests += 1
            self.stats.samples += len(batch)
            rows = np.tile(np.arange(1, len(batch) + 1, dtype=np.float16)[:, None], (1, self.embed_dim))
            yield batch, TeacherOutputs(rows, rows.copy(), 50.0, None, self.info["fingerprint"])


def _batches(labels_per_batch: list[list[int]]):
    out = []
    for j, labels in enumerate(labels_per_batch):
        n = len(labels)
        out.append(Batch(keys=[f"b{j}-{i}" for i in range(n)], images=np.zeros((n, 4, 4, 3), np.uint8),
                         tokens=np.zeros((n, 3), np.int64), labels=np.asarray(labels, np.int64),
                         captions=[""] * n))
    return out


def test_each_teacher_is_asked_only_for_its_samples():
    configs = [TeacherSourceConfig(mode="remote", name="all"),
               TeacherSourceConfig(mode="remote", name="odd", labels=[1, 3], loss_weight=2.0)]
    sources = [_Recording(6, "fa"), _Recording(4, "fb")]
    multi = MultiTeacher(configs, sources)
    batches = _batches([[0, 1, 2, 3], [0, 2, 2, 0], [3, 3, 0, 1]])
    got = list(multi.stream(batches, view=0))
    assert [len(k) for k in sources[0].asked] == [4, 4, 4]
    assert sources[1].asked == [["b0-1", "b0-3"], ["b2-0", "b2-1", "b2-3"]]  # batch 1 has none of its labels
    first = got[0][1]
    assert isinstance(first, EnsembleOutputs) and first.names == ("all", "odd") and first.weights == (1.0, 2.0)
    assert first.members[0].answered.all()  # every teacher of an ensemble says which rows it answered
    assert first.members[1].answered.tolist() == [False, True, False, True]
    assert first.members[1].image_features[:, 0].tolist() == [0, 1, 0, 2]  # its answers, on their rows
    assert got[1][1].members[1].answered.tolist() == [False] * 4
    assert got[1][1].members[1].image_features.shape == (4, 4)
    metrics = multi.stats.as_metrics()
    assert (metrics["teacher_samples"], metrics["teacher_all_samples"], metrics["teacher_odd_samples"]) == (17, 12, 5)
    assert multi.info["fingerprint"] == "all=fa,odd=fb"


def test_an_ensembles_micro_batches_merge_teacher_by_teacher():
    multi = MultiTeacher([TeacherSourceConfig(mode="remote", name="a"),
                          TeacherSourceConfig(mode="remote", name="b", labels=[1])],
                         [_Recording(6, "fa"), _Recording(4, "fb")])
    parts = [out for _, out in multi.stream(_batches([[0, 1], [1, 1]]), view=0)]
    merged = merge_outputs(parts)
    assert len(merged) == 4 and merged.members[1].answered.tolist() == [False, True, True, True]
    tensors = merged.to_tensors("cpu")
    assert tensors["teacher_weights"] == [0.5, 0.5] and tensors["teachers"][1]["image_features"].shape == (4, 4)


# ------------------------------------------------------------------------------------- provenance


def test_checkpoints_record_every_teacher_and_resume_refuses_a_changed_one():
    from student_trainer.checkpoint import TeacherChangedError, check_same_teacher, provenance

    cfg = _cfg({"mode": "remote", "sources": [{"app_name": "a"}, {"app_name": "b", "labels": [1]}]}).validate()
    record = provenance(cfg, {"fingerprint": "a=fa,b=fb", "model": "m6+m4"})
    assert [(t["name"], t["fingerprint"], t["app_name"], t["labels"]) for t in record["teachers"]] == [
        ("a", "fa", "a", None), ("b", "fb", "b", [1])]
    check_same_teacher(record, "a=fa,b=fb", "run", allow_change=False)
    with pytest.raises(TeacherChangedError, match=r"b: 'fb' -> 'fc'"):
        check_same_teacher(record, "a=fa,b=fc", "run", allow_change=False)
    with pytest.raises(TeacherChangedError, match=r"c: None -> 'fc'"):
        check_same_teacher(record, "a=fa,b=fb,c=fc", "run", allow_change=False)
    check_same_teacher(record, "a=fa,b=fc", "run", allow_change=True)


def test_a_samples_metadata_picks_its_teachers(tmp_path):
    """`teacher` in the captions file → the sample's JSON → Batch.teachers → only those teachers asked."""
    from PIL import Image

    from student_trainer.data.batches import train_batches
    from student_trainer.data.write_shards import write_folder_shards
    from teacher_service.shards import resolve_shards

    images = tmp_path / "imgs"
    images.mkdir()
    rows = ["image,caption,label,teacher"]
    picks = {0: "a", 1: "b", 2: "a;b", 3: ""}
    for i in range(8):
        Image.fromarray(np.full((12, 12, 3), i * 20, np.uint8)).save(images / f"{i}.png")
        rows.append(f"{i}.png,picture {i},{i % 2},{picks[i % 4]}")
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    write_folder_shards(images, images / "captions.csv", tmp_path / "shards")
    batch = next(train_batches(resolve_shards(str(tmp_path / "shards")), rank=0, world_size=1, batch_size=8,
                               image_size=8, epoch=0, seed=0, tokenizer=_tokens, shuffle_buffer=1))
    expect = {"a": ("a",), "b": ("b",), "a;b": ("a", "b"), "": None}
    assert batch.teachers == [expect[picks[int(c.split()[1]) % 4]] for c in batch.captions]

    configs = [TeacherSourceConfig(mode="remote", name="a"),
               TeacherSourceConfig(mode="remote", name="b", labels=[1])]  # metadata wins over labels
    sources = [_Recording(6, "fa"), _Recording(4, "fb")]
    _, out = next(MultiTeacher(configs, sources).stream([batch], view=0))
    wanted = {"a": [p is None or "a" in p for p in batch.teachers],
              "b": [("b" in p) if p is not None else lab == 1 for p, lab in zip(batch.teachers, batch.labels)]}
    for name, source, member in zip("ab", sources, out.members):
        assert source.asked == [[k for k, w in zip(batch.keys, wanted[name]) if w]]
        assert member.answered.tolist() == wanted[name]


def _tokens(captions: list[str]) -> np.ndarray:
    return np.ones((len(captions), 4), np.int64)


def test_every_pool_has_its_prefetch_window_in_flight_while_a_batch_trains(monkeypatch):
    """Two remote teachers (scripted Serve handles): while batch t trains, each pool already holds the
    requests for t+1 .. t+prefetch, as one remote teacher alone does; a lost one stops the stream."""
    import teacher_service.app as app
    from test_teacher_sources import FakeHandle, make_batches

    from student_trainer.teacher.sources import make_teacher_source
    from teacher_service.app import TeacherUnavailableError

    handles = {"a": FakeHandle("fp-a"), "b": FakeHandle("fp-b")}
    monkeypatch.setattr(app, "get_teacher_handle", lambda name, timeout_s=60.0: handles[name])
    cfg = TeacherSourceConfig(mode="remote", prefetch=2, timeout_s=5.0, sources=[{"app_name": "a"}, {"app_name": "b"}])
    multi = make_teacher_source(cfg, run="ens")
    n, prefetch = 6, 2
    for t, (batch, out) in enumerate(multi.stream(make_batches(n), view=0)):
        assert [m.fingerprint for m in out.members] == ["fp-a", "fp-b"]
        for handle in handles.values():
            assert handle.outstanding == min(prefetch, n - 1 - t)  # t+1 .. t+prefetch in flight, in both pools
    assert [h.max_outstanding for h in handles.values()] == [prefetch + 1, prefetch + 1]

    handles["b"].script = lambda call_no, request: TimeoutError("no answer")  # one pool stops answering
    cfg.patience_s, cfg.retries = 0.0, 0
    monkeypatch.setattr("student_trainer.teacher.sources.time.sleep", lambda s: None)
    with pytest.raises(TeacherUnavailableError, match="teacher app 'b'"):
        list(make_teacher_source(cfg, run="ens").stream(make_batches(n), view=0))


def test_both_pools_get_their_first_window_before_either_is_waited_on(monkeypatch):
    """Remote teachers of an ensemble send their first prefetch windows at once (`eager`), so the
    first batch of an epoch waits for the slowest pool, not for the pools one after another."""
    import teacher_service.app as app
    from test_teacher_sources import FakeHandle, make_batches

    from student_trainer.teacher.sources import make_teacher_source

    handles = {"a": FakeHandle("fp-a"), "b": FakeHandle("fp-b")}
    monkeypatch.setattr(app, "get_teacher_handle", lambda name, timeout_s=60.0: handles[name])
    waited_on_a_with_b_sent = []
    real = handles["a"]._embed

    def embed_a(request):
        response = real(request)
        result = response.result
        response.result = lambda timeout_s=None: (waited_on_a_with_b_sent.append(len(handles["b"].sent)),
                                                  result(timeout_s))[1]
        return response

    handles["a"].embed.fn = embed_a
    cfg = TeacherSourceConfig(mode="remote", prefetch=2, sources=[{"app_name": "a"}, {"app_name": "b"}])
    list(make_teacher_source(cfg, run="ens").stream(make_batches(5), view=0))
    assert waited_on_a_with_b_sent[0] == 3  # b's batches 0..2 were out when a's batch 0 was first awaited


def test_an_eager_ensemble_stream_has_every_pools_window_in_flight_when_it_returns(monkeypatch):
    """`stream(eager=True)` on an ensemble opens every member at the call (the loop overlaps the
    first answers with its set-up); a lazy one asks no pool before its first `next()`."""
    import teacher_service.app as app
    from test_teacher_sources import FakeHandle, make_batches

    from student_trainer.teacher.sources import make_teacher_source

    handles = {"a": FakeHandle("fp-a"), "b": FakeHandle("fp-b")}
    monkeypatch.setattr(app, "get_teacher_handle", lambda name, timeout_s=60.0: handles[name])
    cfg = TeacherSourceConfig(mode="remote", prefetch=2, sources=[{"app_name": "a"}, {"app_name": "b"}])
    multi = make_teacher_source(cfg, run="ens")
    lazy = multi.stream(make_batches(4), view=0)
    assert [len(h.sent) for h in handles.values()] == [0, 0]
    eager = multi.stream(make_batches(4), view=1, eager=True)
    assert [len(h.sent) for h in handles.values()] == [3, 3]
    assert len(list(eager)) == 4 and len(list(lazy)) == 4
    assert [len(h.sent) for h in handles.values()] == [8, 8]
