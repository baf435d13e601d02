"""Fuzzing the training shard reader: valid small shards of odd and bad samples, then mutated (bit
flips, truncation, garbage members, garbage files). The reader must never raise anything but
NoUsableSamplesError, every batch must have the right shapes and dtypes, and every sample it
yields must be one written valid, with its own caption, label and pixels wherever the mutation
left its bytes alone. Each test prints how many cases it ran (`pytest -s tests/test_fuzz_shard_reader.py`)."""
from __future__ import annotations

import tarfile
from collections import Counter
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shard_builders import MemberSpan, png, tar_bytes

from student_trainer.data.batches import eval_set, steps_per_epoch, train_batches

from teacher_service.shards import NoUsableSamplesError, ReaderLimits, SkipCounts
from teacher_service.contract.augment import augment_view
from teacher_service.shards import decode_rgb8

LIMITS = ReaderLimits(max_caption_bytes=300, max_member_bytes=1 << 16, max_image_pixels=4096)
CASES: Counter[str] = Counter()  # the cases the running fuzzer tried; each test starts from zero
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=16)

MODES = ["RGB", "L", "LA", "RGBA", "P", "1", "I;16"]


IMAGE_DEFECTS = ["garbage", "truncated", "empty", "too_large"]
CAPTION_DEFECTS = ["missing", "empty", "blank", "not_utf8", "huge"]
DEFECTS = [*IMAGE_DEFECTS, *CAPTION_DEFECTS, "no_image", "bad_label"]


@st.composite
def images(draw, defect: str | None) -> tuple[str, bytes]:
    """(extension, bytes): a valid image of a random mode and size, or the image defect asked for."""
    seed = draw(st.integers(0, 1000))
    if defect == "garbage":  # also non-image bytes with an image extension
        return draw(st.sampled_from(["png", "jpg", "webp", "tif"])), draw(st.binary(max_size=200))
    if defect == "truncated":
        data = png(12, 12, "RGB", seed)
        return "png", data[:draw(st.integers(0, len(data) - 40))]
    if defect == "empty":
        return "png", b""
    if defect == "too_large":
        return "png", png(70, 60, "L", seed)  # 4200 pixels > 4096
    width, height = draw(st.sampled_from([(1, 1), (1, 40), (40, 1), (7, 5), (12, 12), (3, 9)]))
    if draw(st.integers(0, 4)) == 0:
        return "jpg", png(width, height, draw(st.sampled_from(["RGB", "L", "CMYK"])), seed, fmt="JPEG")
    return "png", png(width, height, draw(st.sampled_from(MODES)), seed)


@st.composite
def captions(draw, defect: str | None) -> bytes | None:
    """A caption (some over the context length, kept truncated), or the caption defect asked for."""
    if defect in CAPTION_DEFECTS:
        return {"missing": None, "empty": b"", "blank": b" \n\t", "not_utf8": b"\xff\xfe\xfd caption",
                "huge": b"y" * 301}[defect]
    if draw(st.integers(0, 5)) == 0:
        return ("word " * 50).encode()  # under the byte limit, over the context length
    return draw(st.text(min_size=1, max_size=40).filter(lambda t: t.strip())).encode("utf-8")


@dataclass(repr=False)
class Written:
    key: str
    caption: str | None
    label: int
    image: tuple[str, bytes] | None
    valid: bool

    def __repr__(self) -> str:
        image = None if self.image is None else (self.image[0], len(self.image[1]))
        return f"Written({self.key!r}, caption={self.caption!r}, label={self.label}, image={image}, valid={self.valid})"


@st.composite
def samples(draw, key: str) -> tuple[tuple[str, dict[str, bytes]], Written]:
    """A valid sample (half of them) or one with one defect, members in a random order."""
    defect = draw(st.one_of(st.none(), st.sampled_from(DEFECTS)))
    ext, image = draw(images(defect))
    caption = draw(captions(defect))
    members: dict[str, bytes] = {} if defect == "no_image" else {ext: image}
    if caption is not None:
        members["txt"] = caption
    label = draw(st.integers(-1, 9))
    if defect == "bad_label":
        members["cls"] = draw(st.sampled_from([b"nine?", b"", b"99999999999999999999", b"-7"]))
    elif label >= 0:
        members["cls"] = str(label).encode()
    if draw(st.booleans()):
        members["json"] = b'{"caption": "metadata is not read"}'
    order = draw(st.permutations(list(members)))
    text = caption.decode("utf-8") if defect is None else None
    written = Written(key, text, label, (ext, image) if ext in members else None, defect is None)
    return (key, {m: members[m] for m in order}), written


@dataclass
class Shard:
    data: bytes
    spans: list[MemberSpan]
    written: list[Written]
    touched: set[str] = field(default_factory=set)  # keys whose bytes a mutation may have changed
    cut: int | None = None  # the reader may stop at this byte
    pristine: bool = True  # not mutated at all
    detectable: bool = False  # the mutation damaged the tar structure in a way a reader can see

    def __repr__(self) -> str:  # hypothesis prints failing cases: the tar bytes themselves are unreadable there
        return (f"Shard({len(self.data)} bytes, written={self.written!r}, touched={self.touched}, cut={self.cut}, "
                f"pristine={self.pristine}, spans={[(s.key, s.ext, s.header, s.size) for s in self.spans]})")


@st.composite
def shards(draw, index: int) -> Shard:
    drawn = [draw(samples(f"s{index}-{i}")) for i in range(draw(st.integers(0, 6)))]
    data, spans = tar_bytes([m for m, _ in drawn])
    shard = Shard(data, spans, [w for _, w in drawn])
    mutate(draw, shard)
    return shard


def _span_at(spans: list[MemberSpan], offset: int) -> MemberSpan | None:
    for span in spans:
        if span.header <= offset < span.data + -(-span.size // 512) * 512:
            return span
    return None


def _flip(draw, shard: Shard, data: bytearray, flips: int) -> None:
    """Bit flips in distinct 512-byte blocks (two flips in one header could cancel in its checksum,
    a change no tar reader can see). A flipped header or end marker ends the tar there; a
    flipped data byte changes only its sample."""
    blocks = draw(st.lists(st.integers(0, len(data) // 512 - 1), min_size=flips, max_size=flips, unique=True))
    for block in blocks:
        offset = block * 512 + draw(st.integers(0, 511))
        data[offset] ^= 1 << draw(st.integers(0, 7))
        span = _span_at(shard.spans, offset)
        if span is None or offset < span.data:
            shard.cut = offset if shard.cut is None else min(shard.cut, offset)
        else:
            shard.touched.add(span.key)


def mutate(draw, shard: Shard) -> None:
    """One mutation. Records what it may have changed (``touched``), where reading may stop
    (``cut``) and whether any reader can tell the tar is damaged (``detectable``)."""
    kind = draw(st.sampled_from(["none", "none", "flip", "flips", "truncate", "zero_block", "garbage_member",
                                 "garbage_file", "append"]))
    if kind != "none":
        CASES["mutated"] += 1
        shard.pristine = False
    data = bytearray(shard.data)
    if kind in ("flip", "flips"):
        _flip(draw, shard, data, 1 if kind == "flip" else min(len(data) // 512, draw(st.integers(2, 6))))
        shard.detectable = shard.cut is not None  # a flipped header or end marker; data flips are not
    elif kind == "truncate":
        shard.cut = draw(st.integers(0, len(data) - 1))
        data = data[: shard.cut]
        shard.detectable = shard.cut < _end_of_members(shard.spans) + 512  # else it ends after a whole end block
    elif kind == "zero_block":  # looks like the end-of-archive marker when it hits a header
        offset = draw(st.integers(0, len(data) // 512 - 1)) * 512
        data[offset:offset + 512] = bytes(512)
        span = _span_at(shard.spans, offset)
        if span is not None and offset < span.data:
            shard.cut = offset
            shard.detectable = any(data[offset:])  # members after it: else a valid, shorter tar
        elif span is not None:
            shard.touched.add(span.key)
    elif kind == "garbage_member":
        at = draw(st.integers(0, len(shard.spans)))
        name = draw(st.sampled_from(["zz.png", "zz.txt", "zz", "__meta__", "zz.cls", "dir/zz.jpg"]))
        garbage = _member_blocks(name, draw(st.binary(max_size=300)))
        offset = shard.spans[at].header if at < len(shard.spans) else _end_of_members(shard.spans)
        data = data[:offset] + garbage + data[offset:]
        if 0 < at < len(shard.spans) and shard.spans[at].key == shard.spans[at - 1].key:
            shard.touched.add(shard.spans[at].key)  # the garbage splits this sample in two
    elif kind == "garbage_file":
        data = bytearray(draw(st.binary(max_size=2000)))
        shard.cut = 0
        shard.detectable = len(data) < 512 or any(data)  # 512+ zero bytes are a valid empty tar
    elif kind == "append":  # trailing bytes after the end marker: a corrupt end, the last sample dropped
        shard.cut = len(data)
        tail = draw(st.binary(min_size=1, max_size=600))
        data += tail
        shard.detectable = any(tail)
    shard.data = bytes(data)


def _end_of_members(spans: list[MemberSpan]) -> int:
    last = spans[-1] if spans else None
    return last.data + -(-last.size // 512) * 512 if last else 0


def _member_blocks(name: str, data: bytes) -> bytes:
    """One tar member (header and padded data), to splice into another tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def _sample_end(shard: Shard, key: str) -> int:
    return max((s.data + s.size for s in shard.spans if s.key == key), default=-1)  # -1: no members at all


def _write(directory: Path, drawn: list[Shard]) -> list[str]:
    paths = []
    for i, shard in enumerate(drawn):
        path = directory / f"shard-{i:02d}.tar"
        path.write_bytes(shard.data)
        paths.append(str(path))
    return paths


def _check_yielded(batch, drawn: list[Shard], image_size: int, train: bool) -> None:
    """Every yielded sample was written valid; untouched ones carry exactly their own content."""
    assert batch.images.dtype == np.uint8 and batch.images.shape == (len(batch), image_size, image_size, 3)
    assert batch.tokens.dtype == np.int64 and batch.tokens.shape[0] == len(batch)
    assert batch.labels.dtype == np.int64 and len(batch.captions) == len(batch)
    written = {w.key: (w, s) for s in drawn for w in s.written}
    for i, key in enumerate(batch.keys):
        assert key in written, f"yielded {key!r}, never written"
        w, shard = written[key]
        if key in shard.touched:
            continue  # its bytes changed: only shapes and types can be checked
        assert w.valid, f"yielded {key!r}, written invalid"
        if shard.cut is not None:
            assert _sample_end(shard, key) <= shard.cut, f"yielded {key!r} from past the corruption"
        assert batch.captions[i] == w.caption and batch.labels[i] == w.label
        if not train:
            expected = augment_view(decode_rgb8(w.image[1]), key, 0, 0, image_size, train=False)
            np.testing.assert_array_equal(batch.images[i], expected)


def _must_yield(shard: Shard) -> list[str]:
    """Valid untouched samples the reader must not lose: all of them in an intact shard; before a
    cut, all but the last one (the sample being read when a tar breaks is dropped)."""
    keys = [w.key for w in shard.written if w.valid and w.key not in shard.touched]
    if shard.cut is None:
        return keys
    before = [w.key for w in shard.written if _sample_end(shard, w.key) + 512 <= shard.cut]
    return [k for k in keys if k in before[:-1]]


@SETTINGS
@given(drawn=st.integers(1, 3).flatmap(lambda n: st.tuples(*[shards(i) for i in range(n)])))
def fuzz_eval_reader(tokenizer, drawn):
    CASES["eval"] += 1
    drawn = list(drawn)
    with tempfile.TemporaryDirectory() as d:
        paths = _write(Path(d), drawn)
        skips = SkipCounts(log_first=0)
        try:
            batch = eval_set(paths, image_size=6, tokenizer=tokenizer, skips=skips, limits=LIMITS)
        except NoUsableSamplesError as exc:
            CASES["no_usable"] += 1
            assert all(p in str(exc) for p in paths)
            assert not any(_must_yield(s) for s in drawn)
            assert skips.skipped.get("corrupt_tar", 0) == sum(s.detectable for s in drawn)
            return
    _check_yielded(batch, drawn, 6, train=False)
    for shard in drawn:
        assert set(_must_yield(shard)) <= set(batch.keys), "a valid sample was lost"
    # each damaged tar is counted once, and only those
    assert skips.skipped.get("corrupt_tar", 0) == sum(s.detectable for s in drawn)
    intact = all(s.pristine for s in drawn)
    if intact:  # every sample read is either yielded or skipped with a reason
        written = sum(_sample_end(s, w.key) >= 0 for s in drawn for w in s.written)  # samples with members
        assert len(batch) + skips.total == written and "corrupt_tar" not in skips.skipped
        assert batch.keys == [w.key for s in drawn for w in s.written if w.valid]
    CASES["yielded"] += len(batch)
    CASES["skipped"] += skips.total


@settings(SETTINGS, max_examples=200)
@given(drawn=st.tuples(shards(0), shards(1)), world=st.integers(1, 2), batch_size=st.integers(1, 3))
def fuzz_train_reader(tokenizer, drawn, world, batch_size):
    CASES["train"] += 1
    drawn = list(drawn)
    with tempfile.TemporaryDirectory() as d:
        paths = _write(Path(d), drawn)
        try:
            steps = steps_per_epoch(paths, world_size=world, batch_size=batch_size)
        except ValueError:
            return  # too few samples to plan one batch: refused before reading, naming the counts
        for rank in range(world):
            skips = SkipCounts(log_first=0)
            try:
                batches = list(train_batches(paths, rank=rank, world_size=world, batch_size=batch_size,
                                             image_size=6, epoch=1, seed=2, tokenizer=tokenizer, shuffle_buffer=3,
                                             skips=skips, limits=LIMITS))
            except NoUsableSamplesError:
                CASES["no_usable"] += 1
                continue
            assert len(batches) == steps and all(len(b) == batch_size for b in batches)
            for batch in batches:
                _check_yielded(batch, drawn, 6, train=True)


def test_eval_reader_skips_bad_input_and_yields_only_written_samples(tokenizer):
    CASES.clear()
    fuzz_eval_reader(tokenizer)
    print(f"shard reader fuzz: {CASES['eval']} eval cases ({CASES['mutated']} shards mutated), {CASES['yielded']} "
          f"samples yielded, {CASES['skipped']} skipped, {CASES['no_usable']} with no usable sample")
    assert CASES["eval"] > 0  # hypothesis may stop early, but not before a case ran


def test_train_reader_yields_exact_full_batches_of_written_samples(tokenizer):
    CASES.clear()
    fuzz_train_reader(tokenizer)
    print(f"shard reader fuzz: {CASES['train']} train cases ({CASES['mutated']} shards mutated), "
          f"{CASES['no_usable']} readers with no usable sample")
    assert CASES["train"] > 0
