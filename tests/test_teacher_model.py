"""TeacherConfig, preprocessing, checkpoint loading, freezing, fingerprint and encode()."""
from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from teacher_service import (
    GrpcOptions,
    PreprocessSpec,
    ServingConfig,
    TeacherConfig,
    compute_fingerprint,
    fit_context,
    load_state_dict_file,
    load_teacher,
    preprocess_spec,
    to_model_input,
)

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
EOT = 49407


def tiny_cfg(**kw) -> TeacherConfig:
    return TeacherConfig(**{"overrides": TINY, **kw})


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(tiny_cfg())


def rand_images(n, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def rand_tokens(n, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tok = np.zeros((n, length), np.int64)
    for i in range(n):
        k = int(rng.integers(1, length - 2))
        tok[i, 0] = 49406
        tok[i, 1:k + 1] = rng.integers(1, 49000, k)
        tok[i, k + 1] = EOT
    return tok


# ---------------------------------------------------------------- config
# The flat TeacherConfig before the split into sections (what YAML files written before it hold).
FLAT = {"model": "ViT-B-32", "overrides": TINY, "precision": "bf16", "seed": 3, "torch_threads": 1,
        "app_name": "kd-flat", "num_cpus": 0.5, "max_batch_size": 64, "expected_request_samples": 16,
        "grpc_port": 0, "grpc_caller_max_in_flight": 8}
NESTED = {"model": "ViT-B-32", "overrides": TINY, "precision": "bf16", "seed": 3, "torch_threads": 1,
          "serving": {"app_name": "kd-flat", "num_cpus": 0.5, "max_batch_size": 64, "expected_request_samples": 16},
          "grpc": {"port": 0, "caller_max_in_flight": 8}}


def future_warnings(load):
    """(what `load()` returns, the messages of the FutureWarnings it issued, every one kept)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    return result, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_config_roundtrip_dict_and_yaml(tmp_path):
    cfg = tiny_cfg(precision="bf16", torch_threads=2, serving=ServingConfig(num_cpus=0.5, shard_roots=["/data"]),
                   grpc=GrpcOptions(port=0, caller_samples_per_s=50.0))
    data = cfg.to_dict()
    assert data["serving"]["num_cpus"] == 0.5 and data["grpc"]["caller_samples_per_s"] == 50.0
    assert "num_cpus" not in data and not [k for k in data if k.startswith("grpc_")]
    (same, said) = future_warnings(lambda: TeacherConfig.from_dict(data))
    assert same == cfg and said == []
    cfg.to_yaml(tmp_path / "t.yaml")
    (loaded, said) = future_warnings(lambda: TeacherConfig.from_yaml(tmp_path / "t.yaml"))
    assert loaded == cfg and said == []
    assert not list(tmp_path.glob("*.tmp-*"))
    assert cfg.updated({"serving.num_replicas": 3, "grpc.port": None, "precision": "fp16"}) == tiny_cfg(
        precision="fp16", torch_threads=2, serving=ServingConfig(num_cpus=0.5, shard_roots=["/data"], num_replicas=3),
        grpc=GrpcOptions(caller_samples_per_s=50.0))
    with pytest.raises(ValueError, match=r"unknown section in 'serve.num_replicas'"):
        cfg.updated({"serve.num_replicas": 3})


def test_flat_config_loads_with_one_deprecation_line(tmp_path):
    """A flat mapping (a YAML file, a Serve config's args) still loads, into the same config as the
    sectioned one, with one warning for the whole load naming where each flat key went."""
    (cfg, said) = future_warnings(lambda: TeacherConfig.from_dict(FLAT))
    assert cfg == TeacherConfig.from_dict(NESTED) and cfg.serving.app_name == "kd-flat" and cfg.grpc.port == 0
    assert said == ["teacher config: flat keys are deprecated: app_name -> serving.app_name, num_cpus -> "
                    "serving.num_cpus, max_batch_size -> serving.max_batch_size, expected_request_samples -> "
                    "serving.expected_request_samples, grpc_port -> grpc.port, grpc_caller_max_in_flight -> "
                    "grpc.caller_max_in_flight"]
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "kd-flat", "import_path": "x:y", "args": FLAT}]}))
    (loaded, said) = future_warnings(lambda: TeacherConfig.from_yaml(path))
    assert loaded == cfg and len(said) == 1 and said[0].startswith(f"{path}: teacher config: flat keys are deprecated")
    (_, said) = future_warnings(lambda: TeacherConfig.from_dict({"model": "ViT-B-32", "precision": "fp16"}))
    assert said == []  # the model's fields did not move: a model-only mapping is already the new shape
    with pytest.raises(ValueError, match=r"serving.max_batch_size is given twice: as serving.max_batch_size and as "
                                         r"the flat key max_batch_size"):
        TeacherConfig.from_dict({"max_batch_size": 8, "serving": {"max_batch_size": 16}})
    assert FLAT["app_name"] == "kd-flat" and "serving" not in FLAT  # the caller's mapping is left as it was


def test_config_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown keys \['bogus', 'max_batch'\]"):
        TeacherConfig.from_dict({"model": "ViT-B-32", "bogus": 1, "max_batch": 3})
    with pytest.raises(ValueError, match=r"unknown keys \['serving.max_batch'\]; known keys of serving"):
        TeacherConfig.from_dict({"serving": {"max_batch": 3}})
    with pytest.raises(ValueError, match=r"unknown keys \['grpc.grpc_port'\]"):
        TeacherConfig.from_dict({"grpc": {"grpc_port": 3}})
    with pytest.raises(ValueError, match=r"serving: expected a mapping, got list"):
        TeacherConfig.from_dict({"serving": [1]})


def test_config_rejects_bad_values_naming_their_section():
    with pytest.raises(ValueError, match="precision"):
        TeacherConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"serving.max_batch_size: expected >= 1, got 0"):
        TeacherConfig(serving=ServingConfig(max_batch_size=0))
    with pytest.raises(ValueError, match=r"serving.shard_cache_mb: expected >= 0"):
        TeacherConfig.from_dict({"serving": {"shard_cache_mb": -1}})
    with pytest.raises(ValueError, match=r"grpc.port: expected an int in 0..65535"):
        TeacherConfig.from_dict({"grpc": {"port": 70000}})
    with pytest.raises(ValueError, match=r"grpc.port: expected an int in 0..65535"):  # the flat key, named anew
        future_warnings(lambda: TeacherConfig.from_dict({"grpc_port": 70000}))


def test_config_max_ongoing_requests_must_fill_a_batch():
    # 256 samples / 8 per request = 32 requests must be able to sit on one replica
    with pytest.raises(ValueError, match=r"max_ongoing_requests=16 is too small.*needs 32 requests"):
        TeacherConfig(serving=ServingConfig(max_batch_size=256, expected_request_samples=8, max_ongoing_requests=16))
    assert TeacherConfig(serving=ServingConfig(max_batch_size=256, expected_request_samples=8, max_ongoing_requests=32))
    assert TeacherConfig(serving=ServingConfig(max_batch_size=256, expected_request_samples=64, max_ongoing_requests=4))


def test_a_replica_receives_the_model_and_serving_only():
    cfg = TeacherConfig.from_dict(NESTED)
    replica = cfg.replica_dict()
    assert set(replica) == set(cfg.to_dict()) - {"grpc"} and replica["serving"] == cfg.to_dict()["serving"]
    rebuilt = TeacherConfig.from_dict(replica)
    assert rebuilt.grpc == GrpcOptions() and rebuilt.serving == cfg.serving and rebuilt.precision == "bf16"


def test_a_recorded_teacher_config_loads_in_either_shape_without_its_ingress(tmp_path):
    """A cache's record of its teacher (flat when written before the sections) loads silently: its
    reader cannot rewrite it; and the ingress's files it names (here: gone) are not read."""
    record = {**FLAT, "grpc_token_file": str(tmp_path / "gone-token")}
    (cfg, said) = future_warnings(lambda: TeacherConfig.from_record(record))
    assert said == [] and cfg.grpc == GrpcOptions() and cfg.serving == TeacherConfig.from_dict(NESTED).serving
    assert TeacherConfig.from_record(cfg.replica_dict()) == cfg


def test_fingerprint_is_the_one_main_computed(teacher):
    """The fingerprint follows from the model and preprocessing, not from the config's shape. The
    values were printed on main at cbf4471 (before the split), with this test's TINY, by
    `load_teacher(TeacherConfig(overrides=TINY)).fingerprint` and, for FLAT's teacher (bf16, seed 3,
    with serving and gRPC fields), `load_teacher(TeacherConfig(**FLAT)).fingerprint`."""
    assert teacher.fingerprint == "cf925d5e202ceb1b"
    (flat, _) = future_warnings(lambda: TeacherConfig.from_dict(FLAT))
    assert load_teacher(flat).fingerprint == "11e453a3d437ab48"


# ---------------------------------------------------------------- preprocess
SPEC = PreprocessSpec((32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")


def test_preprocess_spec_from_open_clip_model(teacher):
    spec = preprocess_spec(teacher.model)
    assert spec.image_size == (32, 32)
    assert spec.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert spec.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert spec.interpolation == "bicubic"


def test_to_model_input_exact_normalisation_at_native_size():
    img = rand_images(2)
    x = to_model_input(img, SPEC)
    ref = (img.astype(np.float32) / 255 - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), ref.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    # tensor input and numpy input agree; dtype is honoured
    np.testing.assert_array_equal(to_model_input(torch.from_numpy(img), SPEC).numpy(), x.numpy())
    assert to_model_input(img, SPEC, dtype=torch.float16).dtype == torch.float16


def test_to_model_input_read_only_array_ok():
    img = rand_images(1)
    img.setflags(write=False)
    with_ro = to_model_input(img, SPEC)
    np.testing.assert_array_equal(with_ro.numpy(), to_model_input(img.copy(), SPEC).numpy())


def test_to_model_input_resize_keeps_constants_and_centre_crops():
    # left half of a 32x64 image is 0, right half 255; "shortest" keeps the centre 32x32 (half/half),
    # "squash" keeps the whole width; a constant image stays constant after antialiased resize.
    img = np.zeros((1, 32, 64, 3), np.uint8)
    img[:, :, 32:] = 255
    unit = PreprocessSpec((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    crop = to_model_input(img, unit)[0, 0]
    assert crop.shape == (16, 16)
    assert crop[:, 0].max() < 0.05 and crop[:, -1].min() > 0.95  # edges are the two halves
    assert crop.mean().item() == pytest.approx(0.5, abs=0.02)
    squash = to_model_input(img, PreprocessSpec((16, 16), (0.0,) * 3, (1.0,) * 3, "bilinear", "squash"))[0, 0]
    assert squash.mean().item() == pytest.approx(0.5, abs=0.02)
    const = np.full((2, 48, 40, 3), 77, np.uint8)
    np.testing.assert_allclose(to_model_input(const, unit).numpy(), 77 / 255, atol=1e-5)
    bicubic = to_model_input(rand_images(1, 50, 70), SPEC)
    assert bicubic.shape == (1, 3, 32, 32)
    lo = (0 - np.array(SPEC.mean)) / np.array(SPEC.std)
    hi = (1 - np.array(SPEC.mean)) / np.array(SPEC.std)
    for c in range(3):  # bicubic overshoot is clamped to the uint8 range
        assert lo[c] - 1e-5 <= bicubic[0, c].min().item() and bicubic[0, c].max().item() <= hi[c] + 1e-5


@pytest.mark.parametrize("bad", [np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 32, 32), np.uint8),
                                 np.zeros((1, 32, 32, 4), np.uint8), [[1, 2, 3]]])
def test_to_model_input_rejects_non_uint8_rgb(bad):
    with pytest.raises(ValueError, match="images"):
        to_model_input(bad, SPEC)


# ---------------------------------------------------------------- fit_context
def test_fit_context_pads_and_keeps_eot_when_truncating():
    tok = np.array([[49406, 5, 6, EOT, 0, 0], [49406, 1, 2, 3, 4, EOT]], np.int64)
    np.testing.assert_array_equal(fit_context(tok, 8), np.pad(tok, ((0, 0), (0, 2))))
    cut = fit_context(tok, 4)
    np.testing.assert_array_equal(cut, [[49406, 5, 6, EOT], [49406, 1, 2, EOT]])
    assert isinstance(cut, np.ndarray) and cut.dtype == np.int64
    t = fit_context(torch.from_numpy(tok), 4)
    assert isinstance(t, torch.Tensor) and t.tolist() == cut.tolist()
    tok_before = tok.copy()
    fit_context(tok, 4)
    np.testing.assert_array_equal(tok, tok_before)  # input untouched


def test_fit_context_matches_open_clip_tokenizer():
    texts = ["a photo of a cat", "a very long caption " * 10, "dog"]
    long = open_clip.tokenize(texts, context_length=77).numpy()
    short = open_clip.tokenize(texts, context_length=8).numpy()
    np.testing.assert_array_equal(fit_context(long, 8), short)
    # padding a short-context row back to 77 equals the 77 tokenisation for texts that fit in 8
    np.testing.assert_array_equal(fit_context(short, 77)[[0, 2]], long[[0, 2]])


# ---------------------------------------------------------------- loading
def _save_variants(model, tmp_path):
    sd = model.state_dict()
    paths = {}
    paths["plain"] = tmp_path / "plain.pt"
    torch.save(sd, paths["plain"])
    paths["wrapped_module"] = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, paths["wrapped_module"])
    paths["model_key"] = tmp_path / "m.bin"
    torch.save({"model": sd, "step": 10}, paths["model_key"])
    paths["safetensors"] = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
    return paths


def test_load_checkpoint_variants_reproduce_outputs_and_fingerprint(tmp_path):
    source = load_teacher(tiny_cfg(seed=1))
    default = load_teacher(tiny_cfg())  # seed 0: different random weights
    assert default.fingerprint != source.fingerprint
    images, tokens = rand_images(3), rand_tokens(3)
    want = source.encode(images, tokens)
    for kind, path in _save_variants(source.model, tmp_path).items():
        sd = load_state_dict_file(path)
        assert set(sd) == set(source.model.state_dict()), kind
        loaded = load_teacher(tiny_cfg(pretrained=str(path)))  # seed 0, weights must come from the file
        assert loaded.fingerprint == source.fingerprint, kind
        got = loaded.encode(images, tokens)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=kind)


@contextlib.contextmanager
def logged_at_info():
    """Every record that reaches the root logger at INFO and above, in a handler of this test's own:
    pytest's caplog handler lives for the session, and a command run in-process earlier (a quiet
    `kd demo`) may have given it the console filter that drops INFO and this very warning."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, handler = logging.getLogger(), Keep(logging.INFO)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _says_random(records: list[logging.LogRecord]) -> bool:
    return any("No pretrained weights loaded" in r.getMessage() for r in records)


def test_only_a_randomly_initialised_teacher_says_it_has_no_pretrained_weights(tmp_path):
    """open_clip's "No pretrained weights loaded" is true for pretrained=None, false for a local file."""
    path = _save_variants(load_teacher(tiny_cfg(seed=1)).model, tmp_path)["plain"]
    with logged_at_info() as records:
        load_teacher(tiny_cfg(pretrained=str(path)))
    assert not _says_random(records)
    assert any(f"weights loaded from {path}" in r.getMessage() for r in records)
    with logged_at_info() as records:
        load_teacher(tiny_cfg())
    assert _says_random(records)


def test_a_student_loaded_from_its_checkpoint_does_not_say_it_is_random(tmp_path):
    from student_trainer.checkpoint import load_student, save_student
    from student_trainer.config import ModelConfig
    from student_trainer.factory import create_student

    cfg = ModelConfig(name="digits-student")
    with logged_at_info() as records:
        trained = create_student(cfg)
    assert _says_random(records)  # true here
    save_student(trained, cfg, tmp_path)
    with logged_at_info() as records:
        loaded, _ = load_student(tmp_path)
    assert not _says_random(records)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_wrong_architecture_checkpoint_names_file_and_keys(tmp_path):
    other = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 96}}
    wrong = open_clip.create_model("ViT-B-32", pretrained=None, **other)
    path = tmp_path / "wrong.pt"
    torch.save(wrong.state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong\.pt.*does not match.*shape mismatches \['visual\.") as e:
        load_teacher(tiny_cfg(pretrained=str(path)))
    assert "visual.class_embedding: checkpoint (96,) vs model (64,)" in str(e.value)
    sd = load_teacher(tiny_cfg()).model.state_dict()
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"1 missing keys \['logit_scale'\], 1 unexpected keys \['extra\.weight'\]"):
        load_teacher(tiny_cfg(pretrained=str(path)))


def test_unreadable_checkpoint_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt.*could not be read"):
        load_state_dict_file(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_state_dict_file(tmp_path / "missing.pt")
    notsd = tmp_path / "list.pt"
    torch.save({"state_dict": {"a": torch.zeros(1), "b": 3}}, notsd)
    with pytest.raises(ValueError, match=r"list\.pt.*non-tensor entries \['b'\]"):
        load_state_dict_file(notsd)


# ---------------------------------------------------------------- frozen teacher
def test_teacher_is_frozen_and_described(teacher):
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    info = teacher.info()
    assert info["embed_dim"] == teacher.embed_dim == 64
    assert info["context_length"] == teacher.context_length == 16
    assert info["image_size"] == [32, 32]
    assert info["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert info["logit_bias"] is None and info["precision"] == "fp32" and info["device"] == "cpu"
    assert info["fingerprint"] == teacher.fingerprint and len(teacher.fingerprint) == 16


def test_random_init_is_seeded():
    a, b, c = load_teacher(tiny_cfg()), load_teacher(tiny_cfg()), load_teacher(tiny_cfg(seed=5))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_fingerprint_tracks_weights_preprocessing_and_context(teacher):
    m = teacher.model
    base = compute_fingerprint(m, teacher.spec, 16, "ViT-B-32", overrides=TINY)
    assert base == teacher.fingerprint
    assert compute_fingerprint(m, teacher.spec, 16, "ViT-B-32", overrides=TINY) == base
    assert compute_fingerprint(m, SPEC, 16, "ViT-B-32", overrides=TINY) != base
    assert compute_fingerprint(m, teacher.spec, 77, "ViT-B-32", overrides=TINY) != base
    assert compute_fingerprint(m, teacher.spec, 16, "ViT-B-32", precision="fp16", overrides=TINY) != base
    w = m.visual.conv1.weight
    old = w[0, 0, 0, 0].item()
    with torch.no_grad():
        w[0, 0, 0, 0] += 1e-3
    try:
        assert compute_fingerprint(m, teacher.spec, 16, "ViT-B-32", overrides=TINY) != base
    finally:
        with torch.no_grad():
            w[0, 0, 0, 0] = old
    assert compute_fingerprint(m, teacher.spec, 16, "ViT-B-32", overrides=TINY) == base


def test_encode_is_normalised_fp16_and_matches_reference(teacher):
    images, tokens = rand_images(4, 40, 48), rand_tokens(4, length=24)
    out = teacher.encode(images=images, tokens=tokens)
    assert set(out) == {"image_features", "text_features"}
    for v in out.values():
        assert v.dtype == np.float16 and v.shape == (4, 64)
        np.testing.assert_allclose(np.linalg.norm(v.astype(np.float32), axis=1), 1.0, atol=2e-3)
    with torch.no_grad():
        ref_i = F.normalize(teacher.model.encode_image(to_model_input(images, teacher.spec)), dim=-1)
        ref_t = F.normalize(teacher.model.encode_text(torch.from_numpy(fit_context(tokens, 16))), dim=-1)
    np.testing.assert_allclose(out["image_features"].astype(np.float32), ref_i.numpy(), atol=1e-3)
    np.testing.assert_allclose(out["text_features"].astype(np.float32), ref_t.numpy(), atol=1e-3)
    assert set(teacher.encode(images=images)) == {"image_features"}
    assert set(teacher.encode(tokens=tokens)) == {"text_features"}
    with pytest.raises(ValueError):
        teacher.encode()
