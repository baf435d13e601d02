"""Bad input in training shards: every bad sample is skipped and counted by reason, never a crash
and never a wrong sample; a corrupt tar keeps what came before it; nothing usable is a clear error."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from shard_builders import good_sample, png, write_tar

from student_trainer.data.batches import eval_set, steps_per_epoch, train_batches

from teacher_service.shards import (
    SKIP_REASONS,
    NoUsableSamplesError,
    ReaderLimits,
    SkipCounts,
    count_tar_samples,
    decode_rgb8,
)


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def _eval(shards, tokenizer, **kwargs):
    skips = SkipCounts()
    return eval_set([str(s) for s in shards], image_size=8, tokenizer=tokenizer, skips=skips, **kwargs), skips


BAD = {  # reason -> members of one bad sample
    "missing_image": {"txt": b"a caption", "json": b"{}"},
    "undecodable_image": {"png": b"this is not a png", "txt": b"a caption"},
    "truncated_image": {"png": png(9, 9)[:150], "txt": b"a caption"},
    "missing_caption": {"png": png()},
    "undecodable_caption": {"png": png(), "txt": b"\xff\xfe caption"},
    "empty_caption": {"png": png(), "txt": b" \n\t "},
    "bad_label": {"png": png(), "txt": b"a caption", "cls": b"seven"},
    "image_too_large": {"png": png(20, 20), "txt": b"a caption"},  # with max_image_pixels=100
    "caption_too_long": {"png": png(), "txt": b"x" * 101},  # with max_caption_bytes=100
    "member_too_large": {"png": png(), "txt": b"a caption", "json": b"0" * 5000},  # max_member_bytes=4096
}
LIMITS = ReaderLimits(max_caption_bytes=100, max_member_bytes=4096, max_image_pixels=100)


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_sample_is_skipped_with_its_reason(tmp_path, tokenizer, reason, caplog):
    good = [good_sample(i) for i in range(6)]
    write_tar(tmp_path / "a.tar", good[:3] + [("bad", BAD[reason])] + good[3:])
    with caplog.at_level(logging.WARNING, logger="teacher_service.shards.reader"):
        batch, skips = _eval([tmp_path / "a.tar"], tokenizer, limits=LIMITS)
    assert batch.keys == [k for k, _ in good]  # the good ones, in order, none lost around the bad one
    assert batch.captions == [m["txt"].decode() for _, m in good]
    assert skips.skipped == {reason: 1} and skips.total == 1
    assert reason in SKIP_REASONS
    assert "'bad'" in caplog.text and str(tmp_path / "a.tar") in caplog.text and reason in caplog.text


def test_duplicate_member_skips_the_sample(tmp_path, tokenizer):
    from shard_builders import tar_bytes

    good = [good_sample(i) for i in range(3)]
    data, _ = tar_bytes(good[:1] + [("dup", {"png": png()}), ("dup", {"png": png(seed=3), "txt": b"c"})] + good[1:])
    (tmp_path / "a.tar").write_bytes(data)  # dup.png twice in a row: one sample, two png members
    batch, skips = _eval([tmp_path / "a.tar"], tokenizer)
    assert batch.keys == [k for k, _ in good] and skips.skipped == {"duplicate_member": 1}


def _corrupt_header(path, spans, index):
    data = bytearray(path.read_bytes())
    data[spans[index].header + 10] ^= 0x40  # inside the name: the header checksum no longer matches
    path.write_bytes(bytes(data))


def test_corrupt_tar_keeps_samples_before_and_goes_on_with_the_next_shard(tmp_path, tokenizer):
    a = [good_sample(i, "a") for i in range(8)]
    b = [good_sample(i, "b") for i in range(4)]
    spans = write_tar(tmp_path / "a.tar", a)
    write_tar(tmp_path / "b.tar", b)
    first_of_a5 = next(i for i, s in enumerate(spans) if s.key == "a0005")
    _corrupt_header(tmp_path / "a.tar", spans, first_of_a5 + 1)  # a0005's txt header: a0005 is incomplete
    batch, skips = _eval([tmp_path / "a.tar", tmp_path / "b.tar"], tokenizer)
    assert batch.keys == [k for k, _ in a[:5] + b]
    assert skips.skipped == {"corrupt_tar": 1}
    assert count_tar_samples(str(tmp_path / "a.tar")) == 6  # counting stops at the corruption, no raise


@pytest.mark.parametrize("cut", ["mid_data", "member_boundary", "zeroed_block", "not_a_tar", "empty"])
def test_truncated_or_garbled_tars_count_once(tmp_path, tokenizer, cut):
    a = [good_sample(i, "a") for i in range(6)]
    spans = write_tar(tmp_path / "a.tar", a)
    write_tar(tmp_path / "b.tar", [good_sample(0, "b")])
    data = (tmp_path / "a.tar").read_bytes()
    third = next(s for s in spans if s.key == "a0003")  # first member of a0003
    if cut == "mid_data":
        data = data[: third.data + 7]
    elif cut == "member_boundary":
        data = data[: third.header]
    elif cut == "zeroed_block":
        data = data[: third.header] + bytes(512) + data[third.header + 512:]
    elif cut == "not_a_tar":
        data = bytes(range(256)) * 7
    else:
        data = b""
    (tmp_path / "a.tar").write_bytes(data)
    batch, skips = _eval([tmp_path / "a.tar", tmp_path / "b.tar"], tokenizer)
    kept = [] if cut in ("not_a_tar", "empty") else ["a0000", "a0001"]  # a0002 was being read: dropped
    if cut == "mid_data":
        kept = ["a0000", "a0001", "a0002"]  # a0002 complete before a0003's data was cut
    assert batch.keys == kept + ["b0000"]
    assert skips.skipped == {"corrupt_tar": 1}


def test_nothing_usable_raises_naming_shards_and_reasons(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [("x", BAD["missing_caption"]), ("y", BAD["undecodable_image"])])
    (tmp_path / "b.tar").write_bytes(b"garbage" * 100)
    shards = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(NoUsableSamplesError, match="no usable samples") as err:
        _eval(shards, tokenizer)
    assert all(s in str(err.value) for s in shards) and "missing_caption" in str(err.value)
    assert steps_per_epoch(shards, world_size=1, batch_size=1) == 2  # the planner counted 2 samples
    with pytest.raises(NoUsableSamplesError, match="whole pass") as err:  # not an endless loop
        next(train_batches(shards, rank=0, world_size=1, batch_size=1, image_size=8, epoch=0, seed=0,
                           tokenizer=tokenizer))
    assert "corrupt_tar" in str(err.value) and "undecodable_image" in str(err.value)


def test_train_batches_stay_full_and_clean_around_bad_samples(tmp_path, tokenizer):
    """12 samples, 4 bad: every rank still yields steps_per_epoch batches of batch_size, good keys only."""
    good = [good_sample(i) for i in range(8)]
    bad = [(f"bad{r}", BAD[r]) for r in ("missing_caption", "truncated_image", "empty_caption", "bad_label")]
    write_tar(tmp_path / "a.tar", good[:4] + bad[:2])
    write_tar(tmp_path / "b.tar", bad[2:] + good[4:])
    shards = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    for world in (1, 2):
        steps = steps_per_epoch(shards, world_size=world, batch_size=4)
        for rank in range(world):
            skips = SkipCounts()
            batches = list(train_batches(shards, rank=rank, world_size=world, batch_size=4, image_size=8, epoch=1,
                                         seed=3, tokenizer=tokenizer, shuffle_buffer=4, skips=skips))
            assert len(batches) == steps and all(len(b) == 4 for b in batches)
            for batch in batches:
                assert set(batch.keys) <= {k for k, _ in good}
                assert batch.images.shape == (4, 8, 8, 3) and batch.images.dtype == np.uint8
                assert batch.tokens.shape == (4, 16) and batch.labels.tolist() == [int(k[-1]) % 10 for k in batch.keys]
            assert set(skips.skipped) <= {"missing_caption", "truncated_image", "empty_caption", "bad_label"}
    runs = []
    for _ in range(2):  # one rank, 3 batches of 4 from 8 good samples: a whole pass, then a wrap
        runs.append(SkipCounts())
        list(train_batches(shards, rank=0, world_size=1, batch_size=4, image_size=8, epoch=1, seed=3,
                           tokenizer=tokenizer, shuffle_buffer=4, skips=runs[-1]))
    assert set(runs[0].skipped) == {"missing_caption", "truncated_image", "empty_caption", "bad_label"}
    assert runs[0].skipped == runs[1].skipped  # deterministic


ODD = [("L", 7, 5), ("LA", 7, 5), ("RGBA", 7, 5), ("P", 7, 5), ("1", 7, 5), ("I;16", 7, 5), ("RGB", 1, 300),
       ("RGB", 300, 1), ("L", 1, 1), ("RGB", 2000, 3)]


@pytest.mark.parametrize("mode, width, height", ODD)
def test_odd_images_become_rgb_views_of_the_right_shape(tmp_path, tokenizer, mode, width, height):
    data = png(width, height, mode)
    write_tar(tmp_path / "a.tar", [("odd", {"png": data, "txt": b"an odd image"})])
    batch, skips = _eval([tmp_path / "a.tar"], tokenizer)
    assert skips.total == 0 and batch.images.shape == (1, 8, 8, 3) and batch.images.dtype == np.uint8
    decoded = decode_rgb8(data)  # what precompute decodes: the same pixels
    assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8
    views = list(train_batches([str(tmp_path / "a.tar")], rank=0, world_size=1, batch_size=1, image_size=8,
                               epoch=0, seed=0, tokenizer=tokenizer))
    assert views[0].images.shape == (1, 8, 8, 3) and views[0].images.dtype == np.uint8


def test_sixteen_bit_keeps_its_top_byte_and_cmyk_jpeg_decodes(tmp_path):
    import io

    from PIL import Image

    wide = np.array([[0, 256, 4095, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    assert decode_rgb8(buffer.getvalue())[..., 0].tolist() == [[0, 1, 15, 255]]  # not clipped to white
    cmyk = decode_rgb8(png(5, 4, "CMYK", fmt="JPEG"))
    assert cmyk.shape == (4, 5, 3) and cmyk.dtype == np.uint8


def test_long_captions_are_kept_truncated_and_counted(tmp_path, tokenizer):
    """Context 16 = start + 14 words + end: 14 words fit exactly, 15 are cut (kept, counted)."""
    samples = [("fits", {"png": png(), "txt": " ".join(["a"] * 14).encode()}),
               ("long", {"png": png(), "txt": " ".join(["a"] * 15).encode()}),
               ("huge", {"png": png(), "txt": ("word " * 5000).encode()})]
    write_tar(tmp_path / "a.tar", samples)
    batch, skips = _eval([tmp_path / "a.tar"], tokenizer)
    assert batch.keys == ["fits", "long", "huge"] and skips.total == 0
    assert skips.noted == {"caption_truncated": 2}
    assert skips.as_metrics()["data_caption_truncated"] == 2
    assert (batch.tokens[:, -1] == 49407).all()  # every row still ends with the end token


def test_skip_counts_metrics_have_fixed_keys_and_logging_is_rate_limited(caplog):
    skips = SkipCounts(log_first=2)
    with caplog.at_level(logging.WARNING, logger="teacher_service.shards.reader"):
        for i in range(120):
            skips.skip("missing_caption", "s.tar", f"k{i}")
    logged = [r for r in caplog.records if "missing_caption" in r.getMessage()]
    assert len(logged) == 4  # the 1st, 2nd, 10th and 100th
    metrics = skips.as_metrics()
    assert set(metrics) == {f"data_skipped_{r}" for r in SKIP_REASONS} | {"data_skipped_total",
                                                                          "data_caption_truncated"}
    assert metrics["data_skipped_missing_caption"] == metrics["data_skipped_total"] == 120


def test_sample_mode_counts_a_corrupt_tar_once_over_ranks(tmp_path, tokenizer):
    """Fewer shards than ranks: every rank reads every shard, only rank 0 counts the tar error."""
    spans = write_tar(tmp_path / "a.tar", [good_sample(i) for i in range(9)])
    _corrupt_header(tmp_path / "a.tar", spans, next(i for i, s in enumerate(spans) if s.key == "s0006"))
    totals, keys = [], []
    for rank in range(2):
        skips = SkipCounts()
        batches = list(train_batches([str(tmp_path / "a.tar")], rank=rank, world_size=2, batch_size=3, image_size=8,
                                     epoch=0, seed=0, tokenizer=tokenizer, shuffle_buffer=100, skips=skips))
        totals.append(skips.skipped.get("corrupt_tar", 0))
        keys.append({k for b in batches for k in b.keys})
    assert totals[0] >= 1 and totals[1] == 0
    assert not keys[0] & keys[1] and keys[0] | keys[1] <= {f"s{i:04d}" for i in range(5)}



def test_precompute_skips_and_counts_bad_samples_as_training_does(tmp_path, tokenizer):
    """Precompute reads with the one shard reader: the same samples as training, bad ones counted by reason."""
    from teacher_service.cache.embedders import make_embedder
    from teacher_service.cache.precompute import ShardEmbedder
    from teacher_service.config import TeacherConfig
    from teacher_service.contract.augment import view_recipe
    from tiny_models import tiny_teacher_overrides

    good = png(8, 8)
    samples = [("a", {"png": good, "txt": b"a digit"}), ("b", {"png": good[: len(good) // 2], "txt": b"cut"}),
               ("c", {"webp": png(9, 7, fmt="WEBP"), "txt": b"webp"}), ("d", {"png": good}),
               ("e", {"tiff": png(5, 5, "L", fmt="TIFF"), "txt": b"grey tiff"})]
    write_tar(tmp_path / "shard-7.tar", samples)
    teacher = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1).to_dict()
    fingerprint = make_embedder(teacher).info["fingerprint"]
    recipe = view_recipe(32, 0, tokenizer="ViT-B-32", context_length=16)
    embedder = ShardEmbedder(teacher, None, recipe, 2, fingerprint, batch_size=2)
    done = embedder.embed_shard(str(tmp_path / "shard-7.tar"))
    assert done.samples == 3 and done.skipped == {"truncated_image": 1, "missing_caption": 1}
    assert sorted(zip(done.rows["key"], done.rows["view"].tolist())) == [(k, v) for k in "ace" for v in (0, 1)]
    assert np.isfinite(done.rows["image_emb"].astype(np.float32)).all()
    batch, skips = _eval([tmp_path / "shard-7.tar"], tokenizer)
    assert set(batch.keys) == {"a", "c", "e"} and skips.skipped == done.skipped
