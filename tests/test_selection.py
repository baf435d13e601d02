"""Teacher-scored data selection (issue 30) without Ray: the score against a hand restatement, the
rows a `Selector` keeps against a choice made by hand (a tiny student for learnability), the pool's
scoring and its reuse in the replica class itself, and the configuration's refusals."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from selection_by_hand import hand_row_losses, hand_top
from tiny_models import tiny_teacher_overrides

from student_trainer.config import DataConfig, SelectionConfig, TeacherSourceConfig, TrainConfig
from student_trainer.data.batches import Batch
from student_trainer.selection import Selector, ensemble_scores, row_scores, student_row_losses, top_rows
from student_trainer.teacher.outputs import EnsembleOutputs, TeacherOutputs
from teacher_service import EmbedRequest, RequestError, TeacherConfig
from teacher_service.scores import ScoreMemo, contrastive_row_loss, teacher_scores


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def super_batch(n: int, seed: int = 0, size: int = 32) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 16), np.int64)
    tokens[:, 0] = 49406
    tokens[:, 1:4] = rng.integers(1, 49000, (n, 3))
    tokens[:, 4] = 49407
    return Batch(keys=[f"s{seed}-{i}" for i in range(n)], images=rng.integers(0, 256, (n, size, size, 3), np.uint8),
                 tokens=tokens, labels=np.arange(n, dtype=np.int64) % 10, captions=[f"c{i}" for i in range(n)])


def teacher_outputs(n: int, dim: int = 8, scale: float = 20.0, seed: int = 1, scores=None) -> TeacherOutputs:
    rng = np.random.default_rng(seed)
    return TeacherOutputs(unit_rows(rng, n, dim).astype(np.float16), unit_rows(rng, n, dim).astype(np.float16),
                          scale, None, f"fp-{seed}", scores=scores)


# ------------------------------------------------------------------------------ the score
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_the_row_loss_is_the_hand_restatement(scale):
    rng = np.random.default_rng(3)
    image, text = unit_rows(rng, 7, 5), unit_rows(rng, 7, 5)
    got = contrastive_row_loss(torch.from_numpy(image), torch.from_numpy(text), scale).numpy()
    np.testing.assert_allclose(got, hand_row_losses(image, text, scale), rtol=1e-9, atol=1e-12)
    half = image.astype(np.float16), text.astype(np.float16)  # the wire's embeddings
    wire = teacher_scores(*half, scale)
    assert wire.dtype == np.float32
    np.testing.assert_allclose(wire, hand_row_losses(*half, scale), rtol=2e-5, atol=1e-5)


def test_the_rows_mean_is_open_clips_clip_loss():
    from open_clip.loss import ClipLoss

    rng = np.random.default_rng(4)
    image, text = (torch.from_numpy(unit_rows(rng, 9, 6)).float() for _ in range(2))
    rows = contrastive_row_loss(image, text, 14.0)
    assert float(rows.mean()) == pytest.approx(float(ClipLoss()(image, text, torch.tensor(14.0))), rel=1e-6)


def test_a_score_needs_both_towers_and_equal_shapes():
    image = np.ones((3, 4), np.float16)
    with pytest.raises(ValueError, match="both the image and the text"):
        teacher_scores(image, None, 10.0)
    with pytest.raises(ValueError, match="same"):
        teacher_scores(image, np.ones((2, 4), np.float16), 10.0)


def test_the_score_memo_is_bounded_in_rows_and_forgets_the_least_recent():
    memo = ScoreMemo(max_rows=10)
    memo.put(b"a", np.zeros(4, np.float32))
    memo.put(b"b", np.ones(4, np.float32))
    assert memo.get(b"a") is not None  # a is now the most recent
    memo.put(b"c", np.full(4, 2, np.float32))  # 12 rows > 10: b goes
    assert memo.get(b"b") is None and memo.get(b"a") is not None and memo.rows() == 8
    memo.put(b"huge", np.zeros(11, np.float32))  # larger than the whole memo: not kept
    assert memo.get(b"huge") is None
    nothing = ScoreMemo(0)
    nothing.put(b"a", np.zeros(1, np.float32))
    assert nothing.get(b"a") is None


def test_a_requests_batch_identity_is_its_content_in_order():
    from teacher_service.serve.coalesce import batch_identity, sample_identities

    batch = super_batch(4)
    base = EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens, view="ns/0")
    renamed = EmbedRequest(keys=[f"x{i}" for i in range(4)], images=batch.images, tokens=batch.tokens, view="other")
    swapped = EmbedRequest(keys=batch.keys, images=batch.images[[1, 0, 2, 3]], tokens=batch.tokens[[1, 0, 2, 3]],
                           view="ns/0")

    def digest(request, fingerprint="t"):
        return batch_identity(sample_identities(request, fingerprint, 16))

    assert digest(base) == digest(renamed)  # keys and view are the caller's word, not the content
    assert digest(base) != digest(swapped)  # another order is another batch (its rows' scores move)
    assert digest(base) != digest(base, fingerprint="another teacher")


def test_top_rows_keeps_the_best_in_batch_order_and_refuses_a_nan():
    assert list(top_rows(np.array([0.5, 3.0, 1.0, 3.0, 2.0]), 3)) == [1, 3, 4]
    assert list(top_rows(np.array([1.0, 1.0, 1.0]), 2)) == [0, 1]  # ties: the earlier rows
    with pytest.raises(FloatingPointError, match="row 1"):
        top_rows(np.array([1.0, np.nan, 0.0]), 1)


# ------------------------------------------------------------------------------ choosing rows
def test_teacher_loss_keeps_the_top_fraction_by_the_teachers_loss_recomputed_by_hand():
    batch, outputs = super_batch(12), teacher_outputs(12)
    selector = Selector(SelectionConfig(score="teacher_loss", k=3), batch_size=4)
    chosen, kept = selector.choose(batch, outputs)
    by_hand = hand_row_losses(outputs.image_features, outputs.text_features, outputs.logit_scale)
    rows = hand_top(by_hand, 4)
    assert chosen.keys == [batch.keys[i] for i in rows]
    np.testing.assert_array_equal(chosen.images, batch.images[rows])
    np.testing.assert_array_equal(kept.image_features, outputs.image_features[rows])  # the super-batch's answers
    np.testing.assert_array_equal(kept.text_features, outputs.text_features[rows])
    s = selector.stats
    assert (s.drawn, s.kept, s.scored_rows) == (12, 4, 12) and s.answer_bytes == outputs.nbytes
    means = s.score_means()
    assert means["selection_score_drawn_mean"] == pytest.approx(np.mean(by_hand), rel=1e-4)
    assert means["selection_score_kept_mean"] == pytest.approx(np.mean([by_hand[i] for i in rows]), rel=1e-4)


def test_the_pools_scores_are_used_as_answered():
    scores = np.array([0, 5, 1, 4, 2, 3], np.float32)  # not the embeddings' losses: the pool's word is taken
    chosen, kept = Selector(SelectionConfig(score="teacher_loss", k=2), 3).choose(
        super_batch(6), teacher_outputs(6, scores=scores))
    assert [k.split("-")[1] for k in chosen.keys] == ["1", "3", "5"]
    np.testing.assert_array_equal(kept.scores, [5, 4, 3])


def test_uniform_keeps_the_first_rows_and_reads_no_score():
    batch = super_batch(8)
    chosen, kept = Selector(SelectionConfig(score="uniform", k=2), 4).choose(batch, None)
    assert chosen.keys == batch.keys[:4] and kept is None


def tiny_student():
    from student_trainer.config import ModelConfig
    from student_trainer.factory import create_student

    torch.manual_seed(0)
    return create_student(ModelConfig(name="ViT-B-32", overrides=tiny_teacher_overrides(8)))


def test_learnability_keeps_the_top_fraction_of_student_minus_teacher_loss_on_a_tiny_model():
    from teacher_service.contract.preprocess import preprocess_spec, to_model_input

    student = tiny_student().train()
    spec = preprocess_spec(student)
    batch, outputs = super_batch(10, seed=5), teacher_outputs(10, seed=6)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng_state = torch.get_rng_state()

    def own(b: Batch) -> np.ndarray:
        return student_row_losses(student, spec, torch.from_numpy(b.images), torch.from_numpy(b.tokens))

    chosen, kept = Selector(SelectionConfig(score="learnability", k=2), 5).choose(batch, outputs, own)

    student.eval()
    with torch.no_grad():
        image = student.encode_image(to_model_input(torch.from_numpy(batch.images), spec), normalize=True)
        text = student.encode_text(torch.from_numpy(batch.tokens), normalize=True)
        scale = float(student.logit_scale.exp())
    student_part = hand_row_losses(image.double().numpy(), text.double().numpy(), scale)
    teacher_part = hand_row_losses(outputs.image_features, outputs.text_features, outputs.logit_scale)
    rows = hand_top([s - t for s, t in zip(student_part, teacher_part)], 5)
    assert chosen.keys == [batch.keys[i] for i in rows]
    np.testing.assert_array_equal(kept.image_features, outputs.image_features[rows])
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # scoring trains nothing
    assert torch.equal(rng_state, torch.get_rng_state())  # and draws nothing


def test_an_ensembles_scores_are_its_teachers_averaged_with_their_loss_weights():
    a, b = teacher_outputs(6, seed=1), teacher_outputs(6, dim=4, scale=50.0, seed=2)
    both = EnsembleOutputs((a, b), ("a", "b"), (1.0, 3.0))
    hand = [0.25 * x + 0.75 * y for x, y in zip(hand_row_losses(a.image_features, a.text_features, 20.0),
                                                  hand_row_losses(b.image_features, b.text_features, 50.0))]
    np.testing.assert_allclose(ensemble_scores(both), hand, rtol=1e-4)
    chosen, kept = Selector(SelectionConfig(score="teacher_loss", k=2), 3).choose(super_batch(6), both)
    rows = hand_top(hand, 3)
    assert [int(k.split("-")[1]) for k in chosen.keys] == rows
    np.testing.assert_array_equal(kept.members[1].text_features, b.text_features[rows])
    skipped = EnsembleOutputs((a, b.take(np.arange(5)).spread(np.arange(5), 6)), ("a", "b"), (1.0, 1.0))
    with pytest.raises(RuntimeError, match="did not answer 1 samples"):
        ensemble_scores(skipped)


def test_outputs_keep_their_scores_through_take_and_merge():
    a, b = teacher_outputs(4, scores=np.arange(4, dtype=np.float32)), teacher_outputs(2, scores=np.ones(2, np.float32))
    np.testing.assert_array_equal(a.take(np.array([3, 1])).scores, [3, 1])
    np.testing.assert_array_equal(TeacherOutputs.merge([a, b]).scores, [0, 1, 2, 3, 1, 1])
    assert TeacherOutputs.merge([a, teacher_outputs(2)]).scores is None


# ------------------------------------------------------------------------------ the pool
TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1, "overrides": tiny_teacher_overrides(16)}


def test_the_replica_scores_a_request_and_answers_an_identical_one_from_its_memo():
    from teacher_service.serve.deployment import TeacherDeployment
    from teacher_service.stats import format_stats, merge_stats

    replica = TeacherDeployment.func_or_class(TeacherConfig.from_dict(TINY).replica_dict())
    batch = super_batch(6)

    def asking(run: str, view: str = "ns/0", keys=None) -> EmbedRequest:
        return EmbedRequest(keys=keys or batch.keys, images=batch.images, tokens=batch.tokens, run=run, view=view,
                            scores=True)

    async def scenario():
        first = await replica.embed(asking("a"))
        again = await replica.embed(asking("b", keys=[f"other-{i}" for i in range(6)]))  # same content
        unviewed = await replica.embed(asking("c", view=""))  # not coalesced: scored again
        plain = await replica.embed(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens,
                                                 run="d", view="ns/0"))
        return first, again, unviewed, plain

    first, again, unviewed, plain = asyncio.run(scenario())
    hand = hand_row_losses(first.image_features, first.text_features, first.logit_scale)
    np.testing.assert_allclose(first.scores, hand, rtol=2e-5, atol=1e-5)
    np.testing.assert_array_equal(again.scores, first.scores)
    np.testing.assert_allclose(unviewed.scores, first.scores, rtol=1e-4)
    assert plain.scores is None and again.compute_s == 0.0 and first.compute_s > 0
    s = replica.counters.snapshot()
    assert (s["scores_requested"], s["scores_computed"], s["scores_reused"]) == (18, 12, 6)
    assert s["runs"]["b"]["scores_reused"] == 6 and s["runs"]["a"]["scores_computed"] == 6
    text = format_stats({"app_name": "x"}, merge_stats([{**s, **asyncio.run(replica.stats())}]))
    assert "scores     requested 18, computed 12 (" in text and "reused 6 (data selection)" in text


def test_scores_come_from_the_full_precision_rows_in_every_answer_dtype():
    """The replica scores the rows it computed, then encodes each caller's answer in that caller's
    dtype: three runs asking for the same super-batch in fp16, bf16 and int8 get the same scores, the
    fp16 rows' scores, which differ from the int8 rows' own (so encoding first would show). An inline
    teacher answering in int8 scores the same way."""
    from student_trainer.config import TeacherSourceConfig
    from student_trainer.teacher.sources import InlineTeacher
    from teacher_service.contract.answer_codec import ANSWER_DTYPES, EncodedRows, decode_rows
    from teacher_service.serve.deployment import TeacherDeployment

    replica = TeacherDeployment.func_or_class(TeacherConfig.from_dict(TINY).replica_dict())
    batch = super_batch(6, seed=5)

    async def scenario():
        return [await replica.embed(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens,
                                                 run=f"run-{d}", view="ns/0", scores=True, answer_dtype=d))
                for d in ANSWER_DTYPES]

    answers = dict(zip(ANSWER_DTYPES, asyncio.run(scenario())))
    fp16 = answers["fp16"]
    want = teacher_scores(fp16.image_features, fp16.text_features, fp16.logit_scale)
    for dtype, answer in answers.items():
        assert isinstance(answer.image_features, np.ndarray if dtype == "fp16" else EncodedRows)
        np.testing.assert_array_equal(answer.scores, want)
    int8 = answers["int8"]
    from_int8 = teacher_scores(decode_rows(int8.image_features), decode_rows(int8.text_features), int8.logit_scale)
    assert not np.allclose(from_int8, want, rtol=1e-4, atol=1e-5)  # the checks below could tell the orders apart

    inline = InlineTeacher(TeacherSourceConfig(mode="inline", teacher=TeacherConfig.from_dict(TINY),
                                               answer_dtype="int8"), run="inline", scores=True)
    (_, outputs), = inline.stream(iter([batch]))
    assert outputs.image_features.dtype == np.float32  # decoded int8
    np.testing.assert_allclose(outputs.scores, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(row_scores(outputs), outputs.scores)


def test_a_score_request_needs_images_and_tokens_and_a_bool():
    from teacher_service.contract.protocol import RequestLimits, validate_request

    batch = super_batch(2)
    with pytest.raises(RequestError, match="scores: .*send both"):
        validate_request(EmbedRequest(keys=batch.keys, tokens=batch.tokens, scores=True), RequestLimits())
    with pytest.raises(RequestError, match="scores: expected a bool"):
        validate_request(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens, scores="yes"),
                         RequestLimits())


# ------------------------------------------------------------------------------ configuration
def run_config(**selection) -> TrainConfig:
    return TrainConfig(data=DataConfig(train_shards="x/train-*.tar"), teacher=TeacherSourceConfig(mode="remote"),
                       selection=SelectionConfig(**selection))


@pytest.mark.parametrize("fields, message", [
    ({"score": "loss"}, r"selection.score 'loss': expected one of \('uniform', 'teacher_loss', 'learnability'\)"),
    ({"k": 0}, r"selection.k: expected an integer >= 1"),
    ({"k": 2.5}, r"selection.k: expected an integer >= 1"),
    ({"scope": "global"}, r"selection.scope 'global': only \('rank',\)"),
    ({"score": "teacher_loss", "k": 1}, r"with selection.k 1 keeps every sample it scores: set k >= 2"),
])
def test_selection_fields_are_refused_by_name(fields, message):
    cfg = run_config(**fields)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_a_score_without_a_teacher_or_with_labelled_teachers_is_refused():
    cfg = run_config(score="learnability", k=2)
    cfg.teacher.mode = "none"
    with pytest.raises(ValueError, match="is scored by the teacher, but teacher.mode is 'none'"):
        cfg.validate()
    cfg.selection.score = "uniform"
    assert cfg.validate().selection.k == 2  # a uniform draw needs no teacher
    cfg = run_config(score="teacher_loss", k=2)
    cfg.teacher.sources = [{"name": "a", "app_name": "a"}, {"name": "b", "app_name": "b", "labels": [0, 1]}]
    with pytest.raises(ValueError, match=r"teachers \['b'\] answer only their labels"):
        cfg.validate()


def test_the_flags_set_the_selection_and_yaml_keeps_it(tmp_path):
    from cluster.cli import build_parser
    from cluster.cli.train import train_config_from_args

    args = build_parser().parse_args(["train", "--train-shards", "x/train-*.tar", "--teacher-mode", "remote",
                                      "--selection-score", "learnability", "--selection-k", "4"])
    cfg = train_config_from_args(args)
    assert (cfg.selection.score, cfg.selection.k, cfg.selection.scope) == ("learnability", 4, "rank")
    assert cfg.selection.draw_size(cfg.data.batch_size) == 4 * cfg.data.batch_size
    cfg.to_yaml(tmp_path / "run.yaml")
    assert TrainConfig.from_yaml(tmp_path / "run.yaml").selection == cfg.selection
    bad = build_parser().parse_args(["train", "--train-shards", "x", "--selection-score", "loss", "--selection-k", "2"])
    with pytest.raises(ValueError, match="selection.score 'loss'"):
        train_config_from_args(bad)


def test_a_super_batch_larger_than_a_pools_request_limit_is_refused_on_the_driver():
    from student_trainer.preflight import _check_request_size

    cfg = run_config(score="teacher_loss", k=4)
    cfg.data.batch_size = 64
    with pytest.raises(ValueError, match=r"selection.k 4 × data.batch_size 64 = 256 samples go to teacher app "
                                         r"'kd-teacher' in one request, more than its max_request_samples 128"):
        _check_request_size(cfg, cfg.teacher, {"max_request_samples": 128})
    _check_request_size(cfg, cfg.teacher, {"max_request_samples": 256})
