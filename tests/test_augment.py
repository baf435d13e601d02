"""augment_view: replayable (same inputs → same bytes, in any process), varied across views/keys."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from teacher_service.contract.augment import augment_view, to_rgb, view_rng


def _image(shape=(20, 28, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_same_inputs_give_identical_bytes():
    image = _image()
    a = augment_view(image, "digits-0001", view=3, seed=7, size=16)
    b = augment_view(image.copy(), "digits-0001", view=3, seed=7, size=16)
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
    assert a.tobytes() == b.tobytes()


def test_identical_across_processes():
    """The generator is seeded from hashlib, not Python's per-process salted hash()."""
    code = (
        "import numpy as np, hashlib;"
        "from teacher_service.contract.augment import augment_view;"
        "im = np.random.default_rng(0).integers(0, 256, size=(20, 28, 3), dtype=np.uint8);"
        "print(hashlib.sha256(augment_view(im, 'digits-0001', 3, 7, 16).tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    import hashlib

    local = hashlib.sha256(augment_view(_image(), "digits-0001", 3, 7, 16).tobytes()).hexdigest()
    assert out == local


@pytest.mark.parametrize("change", ["key", "view", "seed"])
def test_views_differ_when_any_input_changes(change):
    image = _image()
    base = dict(key="k", view=0, seed=0)
    other = dict(base, **{change: {"key": "k2", "view": 1, "seed": 1}[change]})
    a = augment_view(image, size=16, **base)
    b = augment_view(image, size=16, **other)
    assert not np.array_equal(a, b)


def test_eval_view_is_plain_deterministic_resize():
    image = _image((8, 8, 3))
    a = augment_view(image, "a", view=0, seed=0, size=8, train=False)
    b = augment_view(image, "zzz", view=5, seed=9, size=8, train=False)
    np.testing.assert_array_equal(a, image)  # same size: the resize is the identity
    np.testing.assert_array_equal(a, b)
    assert augment_view(image, "a", 0, 0, 24, train=False).shape == (24, 24, 3)


def test_train_view_is_a_crop_without_flips():
    """A left-dark/right-bright ramp keeps its orientation in every view (no horizontal flips)."""
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    for view in range(20):
        out = augment_view(ramp, "ramp", view, seed=0, size=16).astype(int)
        assert out[:, :4].mean() < out[:, -4:].mean()


def test_jitter_is_mild():
    """Brightness/contrast stay within ~±20 %: a mid-grey image stays near mid-grey."""
    grey = np.full((16, 16), 128, dtype=np.uint8)
    means = [augment_view(grey, "g", v, 0, 16).mean() for v in range(30)]
    assert 128 * 0.79 <= min(means) and max(means) <= 128 * 1.21
    assert max(means) - min(means) > 5  # it does vary


@pytest.mark.parametrize("shape", [(9, 11), (9, 11, 1), (9, 11, 3), (9, 11, 4)])
def test_channel_layouts(shape):
    image = _image(shape)
    out = augment_view(image, "x", 0, 0, 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    if len(shape) == 2 or shape[-1] == 1:
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_rgba_drops_alpha():
    rgba = _image((6, 6, 4))
    np.testing.assert_array_equal(to_rgb(rgba), rgba[..., :3])


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="augment_view"):
        augment_view(bad, "k", 0, 0, 8)


def test_rng_depends_on_all_parts():
    draws = {tuple(view_rng(k, v, s).integers(0, 2**31, 4)) for k, v, s in [("a", 0, 0), ("a", 0, 1), ("a", 1, 0), ("b", 0, 0)]}
    assert len(draws) == 4
