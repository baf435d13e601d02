"""Shard reading: spec resolution, equal batch counts per rank, replayable views, tokens, eval set."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from student_trainer.data.batches import Batch, eval_set, samples_per_rank, steps_per_epoch, train_batches

from teacher_service.shards import count_tar_samples, load_dataset_info, resolve_shards
from student_trainer.data.write_shards import CLASS_NAMES, write_digits_shards
from teacher_service.contract.augment import augment_view


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """train: 5 shards [300, 300, 300, 300, 237]; val: 2 shards [300, 60]."""
    out = tmp_path_factory.mktemp("shards")
    write_digits_shards(out, seed=0, image_size=8, samples_per_shard=300)
    return out


def _epoch(shards, tokenizer, *, world, rank, batch_size, epoch=0, seed=0, shuffle_buffer=100):
    return list(train_batches(shards, rank=rank, world_size=world, batch_size=batch_size, image_size=8,
                              epoch=epoch, seed=seed, tokenizer=tokenizer, shuffle_buffer=shuffle_buffer))


def _source_images(shards) -> dict[str, np.ndarray]:
    images = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".png"):
                    images[info.name[:-4]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(info).read())).convert("RGB"))
    return images


# ---------------------------------------------------------------------------------------------
# resolve_shards / dataset info


def test_resolve_shards_patterns(shard_dir):
    d = str(shard_dir)
    train = [f"{d}/train-{i:06d}.tar" for i in range(5)]
    val = [f"{d}/val-{i:06d}.tar" for i in range(2)]
    assert resolve_shards(d) == sorted(train + val)
    assert resolve_shards(d, split="val") == val
    assert resolve_shards(f"{d}/train") == train
    assert resolve_shards(f"{d}/train-*.tar") == train
    assert resolve_shards(f"{d}/train-{{000001..000003}}.tar") == train[1:4]
    assert resolve_shards([f"{d}/val", train[0], train[0]]) == val + train[:1]
    assert resolve_shards(train[2]) == [train[2]]


@pytest.mark.parametrize("spec", ["nowhere/train-*.tar", "{d}/test", "{d}/nothing-*.tar", "/definitely/not/here"])
def test_resolve_shards_empty_names_the_spec(shard_dir, spec):
    spec = spec.format(d=shard_dir)
    with pytest.raises(FileNotFoundError, match="no shards found") as err:
        resolve_shards(spec)
    assert spec in str(err.value)


def test_resolve_shards_brace_with_missing_shard(shard_dir):
    with pytest.raises(FileNotFoundError, match=r"5 shard\(s\) missing, e\.g\. .*train-000005\.tar"):
        resolve_shards(f"{shard_dir}/train-{{000003..000009}}.tar")


def test_load_dataset_info(shard_dir, tmp_path):
    for source in (shard_dir, str(shard_dir), resolve_shards(f"{shard_dir}/val")):
        info = load_dataset_info(source)
        assert info["class_names"] == CLASS_NAMES and info["templates"]
        assert info["splits"]["val"]["samples_per_shard"] == [300, 60]
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_dataset_info(tmp_path)


# ---------------------------------------------------------------------------------------------
# counts


def test_counts_from_dataset_json_and_by_scanning(shard_dir, tmp_path):
    train = resolve_shards(f"{shard_dir}/train")
    assert [count_tar_samples(s) for s in train] == [300, 300, 300, 300, 237]
    for shard in train:  # copies without dataset.json must be counted by scanning
        shutil.copy(shard, tmp_path)
    copies = resolve_shards(str(tmp_path))
    for world in (1, 2, 3):
        assert samples_per_rank(copies, world) == samples_per_rank(train, world) == 1437 // world
    assert steps_per_epoch(train, world_size=3, batch_size=50) == 9
    assert steps_per_epoch(f"{shard_dir}/train", world_size=3, batch_size=50) == 9  # a spec string


def test_steps_per_epoch_rejects_impossible_batches(shard_dir):
    val = resolve_shards(f"{shard_dir}/val")
    with pytest.raises(ValueError, match="cannot fill one batch of 200"):
        steps_per_epoch(val, world_size=2, batch_size=200)
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(val, world_size=1, batch_size=0)


# ---------------------------------------------------------------------------------------------
# per-rank batches


@pytest.mark.parametrize("split, world, batch_size", [
    ("train", 1, 128),  # shard mode, one rank
    ("train", 2, 64),   # shard mode: rank 0 holds 837 samples, rank 1 only 600 and must wrap
    ("train", 3, 64),
    ("val", 3, 32),     # 2 shards < 3 ranks: sample-level split
    ("val", 2, 32),     # shards [300, 60] too uneven for shard split: sample-level
])
def test_every_rank_yields_exactly_steps_full_batches(shard_dir, tokenizer, split, world, batch_size):
    shards = resolve_shards(f"{shard_dir}/{split}")
    steps = steps_per_epoch(shards, world_size=world, batch_size=batch_size)
    total = sum(load_dataset_info(shard_dir)["splits"][split]["samples_per_shard"])
    assert steps == (total // world) // batch_size
    keys_per_rank = []
    for rank in range(world):
        batches = _epoch(shards, tokenizer, world=world, rank=rank, batch_size=batch_size)
        assert len(batches) == steps
        for batch in batches:
            assert isinstance(batch, Batch) and len(batch) == batch_size
            assert batch.images.shape == (batch_size, 8, 8, 3) and batch.images.dtype == np.uint8
            assert batch.tokens.shape == (batch_size, 16) and batch.tokens.dtype == np.int64
            assert batch.labels.dtype == np.int64 and len(batch.captions) == batch_size
        keys_per_rank.append({k for b in batches for k in b.keys})
    for a in range(world):  # ranks never see each other's samples
        for b in range(a + 1, world):
            assert not keys_per_rank[a] & keys_per_rank[b]


def test_sample_split_covers_every_sample_once(shard_dir, tokenizer):
    """360 val samples, 3 ranks, batch 40: each rank sees exactly its 120, all 360 covered."""
    shards = resolve_shards(f"{shard_dir}/val")
    seen = []
    for rank in range(3):
        keys = [k for b in _epoch(shards, tokenizer, world=3, rank=rank, batch_size=40) for k in b.keys]
        assert len(keys) == len(set(keys)) == 120
        seen.extend(keys)
    assert len(set(seen)) == 360


def test_short_rank_wraps_around_its_own_shards(shard_dir, tokenizer):
    train = resolve_shards(f"{shard_dir}/train")
    rank1 = [k for b in _epoch(train, tokenizer, world=2, rank=1, batch_size=64) for k in b.keys]
    own = {k for s in train[1::2] for k in _source_images([s])}
    assert set(rank1) == own  # all 600 of its samples, then 104 repeats
    assert len(rank1) == 704 and len(set(rank1)) == 600


def test_batches_are_replayable_and_shuffled_by_epoch(shard_dir, tokenizer):
    val = resolve_shards(f"{shard_dir}/val")
    a = _epoch(val, tokenizer, world=1, rank=0, batch_size=60, epoch=2, seed=5)
    b = _epoch(val, tokenizer, world=1, rank=0, batch_size=60, epoch=2, seed=5)
    c = _epoch(val, tokenizer, world=1, rank=0, batch_size=60, epoch=3, seed=5)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(np.array_equal(x.images, y.images) for x, y in zip(a, b))
    keys_a = [k for x in a for k in x.keys]
    keys_c = [k for x in c for k in x.keys]
    assert keys_a != keys_c and sorted(keys_a) == sorted(keys_c)


def test_batch_contents_are_the_replayable_views(shard_dir, tokenizer):
    val = resolve_shards(f"{shard_dir}/val")
    source = _source_images(val)
    batch = _epoch(val, tokenizer, world=1, rank=0, batch_size=30, epoch=4, seed=9)[0]
    for i, key in enumerate(batch.keys):
        expected = augment_view(source[key], key, view=4, seed=9, size=8, train=True)
        np.testing.assert_array_equal(batch.images[i], expected)
        assert CLASS_NAMES[batch.labels[i]] in batch.captions[i]
    np.testing.assert_array_equal(batch.tokens, tokenizer(batch.captions).numpy())


def test_train_batches_rejects_bad_rank(shard_dir, tokenizer):
    with pytest.raises(ValueError, match="rank must be in"):
        next(train_batches(resolve_shards(f"{shard_dir}/val"), rank=2, world_size=2, batch_size=8, image_size=8,
                           epoch=0, seed=0, tokenizer=tokenizer))


# ---------------------------------------------------------------------------------------------
# eval set


def test_eval_set_is_deterministic_plain_views(shard_dir, tokenizer):
    val = resolve_shards(f"{shard_dir}/val")
    full = eval_set(val, image_size=8, tokenizer=tokenizer)
    again = eval_set(val, image_size=8, tokenizer=tokenizer)
    assert len(full) == 360 and full.keys == again.keys
    np.testing.assert_array_equal(full.images, again.images)
    source = _source_images(val)
    assert full.keys == list(source)  # shard order, tar order
    np.testing.assert_array_equal(full.images[0], source[full.keys[0]])  # 8→8: plain resize is identity
    meta = {}
    with tarfile.open(val[0]) as tar:
        for info in tar:
            if info.name.endswith(".json"):
                meta[info.name[:-5]] = json.load(tar.extractfile(info))
    assert [meta[k]["label"] for k in full.keys[:300]] == full.labels[:300].tolist()
    assert eval_set(f"{shard_dir}/val", image_size=8, tokenizer=tokenizer, limit=5).keys == full.keys[:5]  # a spec
    limited = eval_set(val, image_size=16, tokenizer=tokenizer, limit=7)
    assert limited.keys == full.keys[:7] and limited.images.shape == (7, 16, 16, 3)


def test_ignores_torch_distributed_environment(shard_dir, tokenizer, monkeypatch):
    """Ray Train sets RANK/WORLD_SIZE; the explicit rank/world must win over webdataset's env lookup."""
    val = resolve_shards(f"{shard_dir}/val")
    plain = _epoch(val, tokenizer, world=2, rank=0, batch_size=60)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    under_env = _epoch(val, tokenizer, world=2, rank=0, batch_size=60)
    assert [b.keys for b in plain] == [b.keys for b in under_env]
    assert len(eval_set(val, image_size=8, tokenizer=tokenizer)) == 360
