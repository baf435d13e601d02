"""Single-process tests of the loss registry: parity with open_clip, slow re-statements of every
CLIP-KD formula, the fixes over the reference code, masking and exact gradient accumulation."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import loss as oc_loss

from student_trainer.losses import (
    DEFAULT_WEIGHTS,
    LOSSES,
    AFDLoss,
    EmbedKDLoss,
    GDLoss,
    ICLLoss,
    LossSet,
    accumulated_backward,
    build_losses,
    clip_loss_grads,
    losses_needing_teacher,
)
from student_trainer.masking import PatchMask, encode_image_masked

pytestmark = pytest.mark.timeout(120)

B, DS, DT = 6, 8, 12


@pytest.fixture(autouse=True)
def _float64():
    """Tight tolerances for the slow re-statements; restored so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def make_inputs(batch: int = B, ds: int = DS, dt: int = DT, seed: int = 0, grad: bool = True):
    """Student (leaf tensors with grad) and teacher dicts."""
    student = {
        "image_features": _unit(batch, ds, seed=seed).requires_grad_(grad),
        "text_features": _unit(batch, ds, seed=seed + 1).requires_grad_(grad),
        "masked_image_features": _unit(batch, ds, seed=seed + 2).requires_grad_(grad),
        "logit_scale": torch.tensor(12.0).requires_grad_(grad),
        "logit_bias": torch.tensor(-4.0).requires_grad_(grad),
        "labels": torch.arange(batch) % 3,
    }
    teacher = {
        "image_features": _unit(batch, dt, seed=seed + 3),
        "text_features": _unit(batch, dt, seed=seed + 4),
        "logit_scale": torch.tensor(60.0),
        "class_centroids": torch.randn(3, dt, generator=torch.Generator().manual_seed(seed + 5)),
    }
    return student, teacher


def grads_of(value: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, tensors, allow_unused=True))


def assert_close_all(a, b, **kw):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, **kw)


# ------------------------------------------------------------------ slow re-statements
def slow_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    terms = []
    for i in range(logits.shape[0]):
        row = logits[i]
        terms.append(-(row[labels[i]] - torch.log(torch.exp(row - row.max()).sum()) - row.max()))
    return torch.stack(terms).mean()


def slow_softmax(row: torch.Tensor) -> torch.Tensor:
    e = torch.exp(row - row.max())
    return e / e.sum()


def slow_clip(img, txt, s):
    y = torch.arange(img.shape[0])
    return (slow_ce(s * img @ txt.T, y) + slow_ce(s * txt @ img.T, y)) / 2


def slow_kl_pair(t_logits, s_logits):
    rows = [-(slow_softmax(t) * torch.log(slow_softmax(s))).sum() for t, s in zip(t_logits, s_logits)]
    return torch.stack(rows).mean()


def slow_kl_div_pair(t_logits, s_logits):
    rows = []
    for t, s in zip(t_logits, s_logits):
        p, q = slow_softmax(t), slow_softmax(s)
        rows.append((p * (torch.log(p) - torch.log(q))).sum())
    return torch.stack(rows).mean()


def proj(x, linear):
    return F.normalize(x if linear is None else x @ linear.weight.T + linear.bias, dim=-1)


def _linear(module):
    return None if isinstance(module, torch.nn.Identity) else module


# ------------------------------------------------------------------ registry / LossSet
def test_registry_and_default_weights():
    assert set(LOSSES) == {"clip", "siglip", "kl", "crd", "fd", "mfd", "icl", "gd", "afd", "embed_kd"}
    assert set(DEFAULT_WEIGHTS) == set(LOSSES)
    assert DEFAULT_WEIGHTS["fd"] == DEFAULT_WEIGHTS["mfd"] == 2000.0
    assert DEFAULT_WEIGHTS["kl"] == DEFAULT_WEIGHTS["crd"] == DEFAULT_WEIGHTS["icl"] == 1.0
    assert not dist.is_initialized()


def test_build_losses_weights_flags_and_shared_heads():
    ls = build_losses({"clip": 1.0, "kl": 0.5, "fd": 2000.0, "icl": 1.0, "gd": 0.0},
                      student_dim=DS, teacher_dim=DT)
    assert isinstance(ls, LossSet)
    assert list(ls.losses) == ["clip", "kl", "fd", "icl"]  # registry order, zero weight dropped
    assert ls.needs_teacher and ls.mask_ratio is None
    assert ls.losses["fd"].projection is ls.losses["icl"].projection  # shared like CLIP-KD
    names = {n for n, _ in ls.named_parameters()}
    assert "losses.icl.log_scale" in names and any("projection.image.weight" in n for n in names)
    student, teacher = make_inputs()
    out = ls(student, teacher)
    assert set(out) == {"clip_loss", "kl_loss", "fd_loss", "icl_loss"}
    raw = ls.losses["kl"](student, teacher)["kl_loss"]
    torch.testing.assert_close(out["kl_loss"], 0.5 * raw)
    raw_fd = ls.losses["fd"](student, teacher)["fd_loss"]
    assert ls.weights["fd"] == 2000.0 * DT / 512  # given at CLIP-KD's D_t = 512, scaled to DT
    torch.testing.assert_close(out["fd_loss"], 2000.0 * DT / 512 * raw_fd)


def test_build_losses_task_only_and_mfd_flags():
    assert build_losses({"clip": 1.0}, student_dim=4, teacher_dim=4).needs_teacher is False
    assert build_losses({"siglip": 1.0, "clip": 1.0}, student_dim=4, teacher_dim=4).needs_teacher is False
    ls = build_losses({"mfd": 2000.0}, student_dim=4, teacher_dim=4, options={"mask_ratio": 0.5})
    assert ls.mask_ratio == 0.5 and ls.needs_teacher
    assert build_losses({"mfd": 1.0}, student_dim=4, teacher_dim=4).mask_ratio == 0.75
    with pytest.raises(ValueError, match="need teacher"):
        ls({"image_features": torch.zeros(2, 4)}, {})


@pytest.mark.parametrize("weights", [{"clip": 1.0}, {"siglip": 1.0, "clip": 1.0}, {"clip": 1.0, "kl": 0.0},
                                     {"clip": 1.0, "icl": 1.0}, {"embed_kd": 1.0}, {"clip": 1.0, "embed_kd": 1.0},
                                     {name: 1.0 for name in LOSSES}])
@pytest.mark.parametrize("centroids", [False, True])
def test_which_losses_need_the_teacher_is_known_before_the_set_is_built(weights, centroids):
    """The loop opens its teacher stream before it builds the losses: what `losses_needing_teacher`
    says must be what the built `LossSet` then says."""
    options = {"num_classes": 3, "class_centroids": torch.randn(3, DT) if centroids else None}
    needing = losses_needing_teacher(weights, centroids_given=centroids)
    assert build_losses(weights, student_dim=DS, teacher_dim=DT, options=options).needs_teacher == bool(needing)
    assert set(needing) <= {n for n, w in weights.items() if w} - {"clip", "siglip"}


@pytest.mark.parametrize("weights, options, match", [
    ({"clip": 1.0, "distill": 1.0}, None, "unknown loss names"),
    ({"clip": -1.0}, None, "'clip'"),
    ({"clip": float("nan")}, None, "'clip'"),
    ({"clip": 0.0}, None, "no loss has a nonzero weight"),
    ({"clip": 1.0}, {"mask_ration": 0.5}, "unknown loss options"),
    ({"embed_kd": 1.0}, None, "num_classes"),
    ({"mfd": 1.0}, {"mask_ratio": 1.0}, "mask_ratio"),
])
def test_build_losses_rejects_bad_input(weights, options, match):
    with pytest.raises(ValueError, match=match):
        build_losses(weights, student_dim=4, teacher_dim=4, options=options)


def test_build_losses_rejects_bad_dims():
    with pytest.raises(ValueError, match="teacher_dim"):
        build_losses({"clip": 1.0}, student_dim=4, teacher_dim=0)


def test_missing_inputs_are_named():
    student, teacher = make_inputs()
    del teacher["text_features"]
    with pytest.raises(KeyError, match=r"'kl'.*teacher\['text_features'\]"):
        LOSSES["kl"]()(student, teacher)
    del student["masked_image_features"]
    with pytest.raises(KeyError, match="masked_image_features"):
        LOSSES["mfd"](DS, DT)(student, teacher)
    with pytest.raises(KeyError, match="logit_bias"):
        LOSSES["siglip"]()({**student, "logit_bias": None}, {})


# ------------------------------------------------------------------ open_clip parity
def test_clip_matches_open_clip_values_and_grads():
    student, _ = make_inputs()
    leaves = [student["image_features"], student["text_features"], student["logit_scale"]]
    ours = LOSSES["clip"]()(student, {})["clip_loss"]
    ref = oc_loss.ClipLoss()(*leaves)
    torch.testing.assert_close(ours, ref)
    assert_close_all(grads_of(ours, leaves), grads_of(ref, leaves))
    torch.testing.assert_close(ours, slow_clip(*leaves))


def test_siglip_matches_open_clip_values_and_grads():
    student, _ = make_inputs()
    leaves = [student["image_features"], student["text_features"], student["logit_scale"], student["logit_bias"]]
    ours = LOSSES["siglip"]()(student, {})["siglip_loss"]
    ref = oc_loss.SigLipLoss()(*leaves)
    torch.testing.assert_close(ours, ref)
    assert_close_all(grads_of(ours, leaves), grads_of(ref, leaves))


def test_kl_matches_open_clip_distill_loss():
    student, teacher = make_inputs()
    leaves = [student["image_features"], student["text_features"], student["logit_scale"]]
    ours = LOSSES["kl"]()(student, teacher)["kl_loss"]
    ref = oc_loss.DistillClipLoss()(*leaves, teacher["image_features"], teacher["text_features"],
                                    teacher["logit_scale"], output_dict=True)["distill_loss"]
    torch.testing.assert_close(ours, ref)
    assert_close_all(grads_of(ours, leaves), grads_of(ref, leaves))


def test_kl_accepts_siglip_teacher_with_bias():
    student, teacher = make_inputs()
    teacher["logit_bias"] = torch.tensor(-10.0)
    ours = LOSSES["kl"]()(student, teacher)["kl_loss"]
    s, t = student, teacher
    st, tt = t["logit_scale"], t["logit_bias"]
    t_img = st * t["image_features"] @ t["text_features"].T + tt
    t_txt = st * t["text_features"] @ t["image_features"].T + tt
    s_img = s["logit_scale"] * s["image_features"] @ s["text_features"].T
    s_txt = s["logit_scale"] * s["text_features"] @ s["image_features"].T
    ref = (slow_kl_pair(t_img, s_img) + slow_kl_pair(t_txt, s_txt)) / 2
    torch.testing.assert_close(ours, ref)


def test_teacher_fp16_and_float_scale_are_accepted():
    student, teacher = make_inputs()
    fp16 = {**teacher, "image_features": teacher["image_features"].half(),
            "text_features": teacher["text_features"].half(), "logit_scale": 60.0}
    a = LOSSES["kl"]()(student, fp16)["kl_loss"]
    b = LOSSES["kl"]()(student, teacher)["kl_loss"]
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ CLIP-KD formulas
def test_crd_matches_formula():
    student, teacher = make_inputs()
    s, t = student, teacher
    ours = LOSSES["crd"]()(s, t)["crd_loss"]
    t_img = t["logit_scale"] * t["image_features"] @ t["text_features"].T
    s_img = s["logit_scale"] * s["image_features"] @ s["text_features"].T
    ref = (slow_kl_div_pair(t_img, s_img) + slow_kl_div_pair(t_img.T, s_img.T)) / 2
    torch.testing.assert_close(ours, ref)
    # KL and the soft cross entropy differ by the teacher entropy only: same gradient
    leaves = [s["image_features"], s["text_features"]]
    kl = LOSSES["kl"]()(s, t)["kl_loss"]
    assert_close_all(grads_of(ours, leaves), grads_of(kl, leaves))
    assert not torch.allclose(ours, kl)


@pytest.mark.parametrize("ds", [DS, DT])
def test_fd_matches_formula(ds):
    student, teacher = make_inputs(ds=ds)
    module = LOSSES["fd"](ds, DT)
    ours = module(student, teacher)["fd_loss"]
    p_img = proj(student["image_features"], _linear(module.projection.image))
    p_txt = proj(student["text_features"], _linear(module.projection.text))
    n = p_img.numel()
    ref = ((p_img - teacher["image_features"]) ** 2).sum() / n + ((p_txt - teacher["text_features"]) ** 2).sum() / n
    torch.testing.assert_close(ours, ref)
    assert (ds == DT) == isinstance(module.projection.image, torch.nn.Identity)


def _padded_pair(width: int) -> tuple[dict, dict]:
    """Student/teacher features living in the first 8 dims of `width`: the same per-sample
    squared errors at every width."""
    student, teacher = make_inputs(ds=8, dt=8, seed=30)
    pad = lambda x: F.pad(x.detach(), (0, width - 8))
    return ({**student, "image_features": pad(student["image_features"]),
             "text_features": pad(student["text_features"]), "masked_image_features": pad(student["image_features"])},
            {**teacher, "image_features": pad(teacher["image_features"]),
             "text_features": pad(teacher["text_features"])})


@pytest.mark.parametrize("name", ["fd", "mfd"])
def test_fd_weight_keeps_the_papers_per_sample_penalty_at_any_width(name):
    """Weight 2000 means 2000/512 · Σ_k ‖Δ_k‖² / B per modality whatever D_t: the value at
    D_t = 512 and 1024 is the same, and equals the paper's (weight 2000, D_t = 512)."""
    values = {}
    for width in (512, 1024):
        student, teacher = _padded_pair(width)
        ls = build_losses({name: DEFAULT_WEIGHTS[name]}, student_dim=width, teacher_dim=width)
        assert ls.weights[name] == 2000.0 * width / 512
        values[width] = ls(student, teacher)[f"{name}_loss"]
    torch.testing.assert_close(values[512], values[1024])
    student, teacher = _padded_pair(512)
    image_key = "masked_image_features" if name == "mfd" else "image_features"
    per_sample = sum(((student[k] - teacher[t]) ** 2).sum(1).mean() for k, t in
                     ((image_key, "image_features"), ("text_features", "text_features")))
    torch.testing.assert_close(values[512], 2000.0 / 512 * per_sample)
    unscaled = build_losses({name: 2000.0}, student_dim=1024, teacher_dim=1024, options={"fd_reference_dim": None})
    assert unscaled.weights[name] == 2000.0


def test_fd_reference_dim_is_checked():
    with pytest.raises(ValueError, match="fd_reference_dim"):
        build_losses({"fd": 1.0}, student_dim=4, teacher_dim=4, options={"fd_reference_dim": 0})


def test_mfd_uses_the_masked_features():
    student, teacher = make_inputs()
    fd = LOSSES["fd"](DS, DT)
    mfd = LOSSES["mfd"](DS, DT, fd.projection, mask_ratio=0.75)
    masked = mfd(student, teacher)["mfd_loss"]
    unmasked_as_masked = mfd({**student, "masked_image_features": student["image_features"]}, teacher)
    torch.testing.assert_close(unmasked_as_masked["mfd_loss"], fd(student, teacher)["fd_loss"])
    assert not torch.allclose(masked, fd(student, teacher)["fd_loss"])
    g = grads_of(masked, [student["masked_image_features"], student["image_features"]])
    assert g[0] is not None and g[0].abs().sum() > 0 and g[1] is None


def test_icl_matches_formula_and_scale_is_exp_clamped():
    student, teacher = make_inputs()
    module = ICLLoss(DS, DT)
    torch.testing.assert_close(module.log_scale.exp(), torch.tensor(1 / 0.07))
    p_img = proj(student["image_features"], module.projection.image)
    p_txt = proj(student["text_features"], module.projection.text)

    def ref(kappa):
        y = torch.arange(B)
        return (slow_ce(kappa * p_img @ teacher["text_features"].T, y)
                + slow_ce(kappa * p_txt @ teacher["image_features"].T, y)) / 2

    torch.testing.assert_close(module(student, teacher)["icl_loss"], ref(1 / 0.07))
    with torch.no_grad():
        module.log_scale.fill_(math.log(1000.0))
    value = module(student, teacher)["icl_loss"]
    torch.testing.assert_close(value, ref(100.0))
    assert torch.autograd.grad(value, module.log_scale)[0] == 0  # clamped: no push beyond 100


def open_clip_grads(img, txt, scale, create_graph):
    """∂ClipLoss/∂(each image, each text embedding) by autograd of open_clip's own ClipLoss."""
    img = img if img.requires_grad else img.detach().requires_grad_(True)
    txt = txt if txt.requires_grad else txt.detach().requires_grad_(True)
    return torch.autograd.grad(oc_loss.ClipLoss()(img, txt, scale), [img, txt], create_graph=create_graph)


def eq7(student_grads, teacher_grads):
    """CLIP-KD eq. 7, written per k: 1/|B| Σ_k ‖∂L_T/∂v_k − ∂L_S/∂v_k‖² + ‖∂L_T/∂s_k − ∂L_S/∂s_k‖²."""
    (s_v, s_s), (t_v, t_s) = student_grads, teacher_grads
    terms = [((t_v[k] - s_v[k]) ** 2).sum() + ((t_s[k] - s_s[k]) ** 2).sum() for k in range(s_v.shape[0])]
    return sum(terms) / len(terms)


def test_clip_loss_grads_equal_open_clip_autograd():
    img, txt = _unit(7, 5, seed=3), _unit(7, 5, seed=4)
    closed = clip_loss_grads(img, txt, 23.0)
    assert_close_all(closed, open_clip_grads(img, txt, torch.tensor(23.0), False))


@pytest.mark.parametrize("ds", [DS, DT])
def test_gd_matches_open_clip_autograd_restatement(ds):
    """GD == eq. 7 on autograd gradients of open_clip ClipLoss (teacher and student, each with its
    own scale), and its training gradient == the restatement's (create_graph for the student)."""
    student, teacher = make_inputs(ds=ds)
    module = GDLoss(ds, DT)
    ours = module(student, teacher)["gd_loss"]
    p_img = proj(student["image_features"], _linear(module.projection.image))
    p_txt = proj(student["text_features"], _linear(module.projection.text))
    s_g = open_clip_grads(p_img, p_txt, student["logit_scale"], True)
    t_g = open_clip_grads(teacher["image_features"], teacher["text_features"], teacher["logit_scale"], False)
    ref = eq7(s_g, t_g)
    torch.testing.assert_close(ours, ref)
    leaves = [student["image_features"], student["text_features"], student["logit_scale"]]
    leaves += list(module.projection.parameters())
    ours_grads = grads_of(ours, leaves)
    assert_close_all(ours_grads, grads_of(ref, leaves))
    assert ours_grads[0].abs().sum() > 0 and ours_grads[2] != 0


def test_gd_is_zero_for_the_teacher_itself_and_uses_each_scale():
    student, teacher = make_inputs(ds=DT)
    same = {**teacher, "image_features": teacher["image_features"].clone().requires_grad_(True),
            "text_features": teacher["text_features"].clone().requires_grad_(True)}
    module = GDLoss(DT, DT)
    torch.testing.assert_close(module(same, teacher)["gd_loss"], torch.tensor(0.0))
    other_scale = module({**same, "logit_scale": torch.tensor(12.0)}, teacher)["gd_loss"]
    assert other_scale > 1e-4  # same features, another scale: other gradients


def clip_kd_code_gd(s_img, s_txt, s_scale, t_img, t_txt, t_scale):
    """CLIP-KD's GD as their code computes it: softmax(C / scale), gradients divided by the
    scale, four per-element MSEs (restated, to check the weight that stands for their 1e8)."""
    def grads(p, k, tau):
        delta = (p @ k.T / tau).softmax(1) - torch.eye(p.shape[0])
        return delta @ k / tau / p.shape[0], delta.T @ p / tau / p.shape[0]

    s = grads(s_img, s_txt, s_scale) + grads(s_txt, s_img, s_scale)
    t = grads(t_img, t_txt, t_scale) + grads(t_txt, t_img, t_scale)
    return sum(F.mse_loss(a, b) for a, b in zip(s, t))


def test_gd_default_weight_stands_for_clip_kd_1e8():
    """At CLIP-KD's operating point (N = 1024, D_t = 512, both scales 100, CLIP-like features)
    1e8 × their term ≈ weight × L_GD (ratio 0.97 here, 0.77 on random features)."""
    n, d, scale = 1024, 512, torch.tensor(100.0)  # their global batch and teacher width
    text_t = _unit(n, d, seed=10)
    image_t = F.normalize(0.3 * text_t + _unit(n, d, seed=11), dim=-1)  # CLIP-like positives
    image_s = F.normalize(image_t + _unit(n, d, seed=12), dim=-1)
    text_s = F.normalize(text_t + _unit(n, d, seed=13), dim=-1)
    ours = GDLoss(d, d)({"image_features": image_s, "text_features": text_s, "logit_scale": scale},
                        {"image_features": image_t, "text_features": text_t, "logit_scale": scale})["gd_loss"]
    theirs = 1e8 * clip_kd_code_gd(image_s, text_s, scale, image_t, text_t, scale)
    assert DEFAULT_WEIGHTS["gd"] == 2e8 / (512 * 100 ** 4)
    assert 0.5 < float(theirs / (DEFAULT_WEIGHTS["gd"] * ours)) < 1.5


def test_gd_magnitude_on_random_unit_features():
    """The scale quoted in docs/design.md: L_GD on random unit features, B = D = 64, about 0.2 at
    both scales 1/0.07 and 16 at both 100 (it grows like s² / B²)."""
    student, teacher = make_inputs(batch=64, ds=64, dt=64, seed=20)
    module = GDLoss(64, 64)
    for scale, low, high in ((1 / 0.07, 0.15, 0.3), (100.0, 12.0, 20.0)):
        student["logit_scale"] = teacher["logit_scale"] = torch.tensor(scale)
        assert low < float(module(student, teacher)["gd_loss"].detach()) < high


def test_afd_with_different_widths_matches_formula():
    student, teacher = make_inputs()
    module = AFDLoss(DS, DT)
    ours = module(student, teacher)["afd_loss"]
    p_img = proj(student["image_features"], module.projection.image)
    p_txt = proj(student["text_features"], module.projection.text)
    w_i, w_t = module.fuse_image, module.fuse_text
    f_img = F.normalize(torch.cat([p_img, teacher["image_features"]], 1) @ w_i.weight.T + w_i.bias, dim=-1)
    f_txt = F.normalize(torch.cat([p_txt, teacher["text_features"]], 1) @ w_t.weight.T + w_t.bias, dim=-1)
    torch.testing.assert_close(ours, slow_clip(f_img, f_txt, torch.tensor(1 / 0.07)))
    assert w_i.in_features == 2 * DT and w_i.out_features == DT
    assert grads_of(ours, [student["image_features"]])[0].abs().sum() > 0


def test_embed_kd_matches_paper_formula_softmax_once():
    """Default: α1·CE(classifier(z), y) + α2·CE(cos(z, P(μ)), y), plain cosines (the paper)."""
    student, teacher = make_inputs()
    module = EmbedKDLoss(DS, DT, num_classes=3, alpha1=0.3, alpha2=0.7)
    ours = module(student, teacher)["embed_kd_loss"]
    z, y = student["image_features"], student["labels"]
    cls_logits = z @ module.classifier.weight.T + module.classifier.bias
    mu = teacher["class_centroids"] @ module.centroid_projection.weight.T + module.centroid_projection.bias
    cosines = torch.stack([torch.stack([F.cosine_similarity(z[i], mu[c], dim=0) for c in range(3)])
                           for i in range(B)])
    ref = 0.3 * slow_ce(cls_logits, y) + 0.7 * slow_ce(cosines, y)
    torch.testing.assert_close(ours, ref)
    twice = 0.3 * slow_ce(cls_logits.softmax(1), y) + 0.7 * slow_ce(cosines, y)  # the reference's bug
    assert not torch.allclose(ours, twice)
    assert grads_of(ours, [student["logit_scale"]])[0] is None  # the CLIP scale plays no part


@pytest.mark.parametrize("option", ["student", None])
def test_embed_kd_student_scale_option(option):
    """embed_scale "student" (or None): the earlier behaviour, centroid cosines × student logit_scale."""
    student, teacher = make_inputs()
    ls = build_losses({"embed_kd": 1.0}, student_dim=DS, teacher_dim=DT,
                      options={"num_classes": 3, "embed_scale": option})
    module = ls.losses["embed_kd"]
    z, y, s = student["image_features"], student["labels"], student["logit_scale"]
    cls_logits = z @ module.classifier.weight.T + module.classifier.bias
    mu = teacher["class_centroids"] @ module.centroid_projection.weight.T + module.centroid_projection.bias
    ref = 0.5 * slow_ce(cls_logits, y) + 0.5 * slow_ce(s * F.normalize(z, dim=-1) @ F.normalize(mu, dim=-1).T, y)
    value = ls(student, teacher)["embed_kd_loss"]
    torch.testing.assert_close(value, ref)
    assert grads_of(value, [s])[0] != 0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "teacher", True])
def test_embed_kd_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match="embed_scale"):
        build_losses({"embed_kd": 1.0}, student_dim=4, teacher_dim=4, options={"num_classes": 3, "embed_scale": bad})


def test_embed_kd_with_centroids_option_needs_no_teacher():
    student, teacher = make_inputs()
    feats = torch.randn(30, DT)
    labels = torch.arange(30) % 3
    cents = torch.stack([feats[labels == c].mean(0) for c in range(3)])  # centroids come from teacher_service
    ls = build_losses({"embed_kd": 1.0}, student_dim=DS, teacher_dim=DT,
                      options={"class_centroids": cents, "embed_scale": 10.0})
    assert ls.needs_teacher is False and ls.losses["embed_kd"].num_classes == 3
    value = ls(student)["embed_kd_loss"]
    same = ls.losses["embed_kd"](student, {"class_centroids": cents})["embed_kd_loss"]
    torch.testing.assert_close(value, same)


def test_every_loss_backprops_into_student_and_heads():
    student, teacher = make_inputs()
    weights = {name: 1.0 for name in LOSSES}
    ls = build_losses(weights, student_dim=DS, teacher_dim=DT, options={"num_classes": 3})
    out = ls(student, teacher)
    assert set(out) == {f"{name}_loss" for name in LOSSES}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    for name, param in ls.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert student["image_features"].grad.abs().sum() > 0


# ------------------------------------------------------------------ masking
def _tiny_clip():
    torch.manual_seed(0)
    return open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).double()


def test_patch_mask_keeps_cls_and_a_subset():
    tokens = torch.randn(3, 17, 4)
    out = PatchMask(0.75, torch.Generator().manual_seed(1))(tokens)
    assert out.shape == (3, 1 + 4, 4)
    torch.testing.assert_close(out[:, 0], tokens[:, 0])
    for b in range(3):
        rows = {tuple(r.tolist()) for r in tokens[b, 1:]}
        assert all(tuple(r.tolist()) in rows for r in out[b, 1:])
        assert len({tuple(r.tolist()) for r in out[b, 1:]}) == 4  # no duplicates


def test_encode_image_masked_really_masks():
    model = _tiny_clip().eval()
    images = torch.randn(2, 3, 32, 32)
    full = model.encode_image(images, normalize=True)
    masked = encode_image_masked(model, images, 0.75, torch.Generator().manual_seed(0))
    again = encode_image_masked(model, images, 0.75, torch.Generator().manual_seed(0))
    other = encode_image_masked(model, images, 0.75, torch.Generator().manual_seed(1))
    assert masked.shape == full.shape
    torch.testing.assert_close(masked.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(masked, full, atol=1e-4)
    assert not torch.allclose(masked, other, atol=1e-4)
    torch.testing.assert_close(masked, again)
    torch.testing.assert_close(encode_image_masked(model, images, 0.0), full)
    torch.testing.assert_close(encode_image_masked(model.visual, images, 0.0), full)
    assert isinstance(model.visual.patch_dropout, torch.nn.Identity)  # restored
    with pytest.raises(ValueError, match="mask_ratio"):
        encode_image_masked(model, images, 1.0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        encode_image_masked(torch.nn.Linear(2, 2), images, 0.5)


# ------------------------------------------------------------------ gradient accumulation
class _TinyStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(10, DS)
        self.text = torch.nn.Linear(9, DS)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, t):
        return {"image_features": F.normalize(self.image(x), dim=-1),
                "text_features": F.normalize(self.text(t), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def test_accumulated_backward_is_exact_for_clip_kl_fd():
    k, b = 3, 4
    torch.manual_seed(0)
    student_model = _TinyStudent()
    losses = build_losses({"clip": 1.0, "kl": 1.0, "fd": 2000.0}, student_dim=DS, teacher_dim=DT)
    params = list(student_model.parameters()) + list(losses.parameters())
    x, t = torch.randn(k * b, 10), torch.randn(k * b, 9)
    _, teacher = make_inputs(batch=k * b)

    out = losses(student_model(x, t), teacher)
    sum(out.values()).backward()
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    values = accumulated_backward(
        losses, lambda j: student_model(x[j * b:(j + 1) * b], t[j * b:(j + 1) * b]), k, teacher)
    accum = [p.grad.clone() for p in params]
    assert_close_all(accum, full)
    torch.testing.assert_close(values["loss"], sum(out.values()).detach())
    for p in params:
        p.grad = None

    # naive accumulation (sum of per-micro-batch losses) is not the big-batch gradient
    for j in range(k):
        sl = slice(j * b, (j + 1) * b)
        part = losses(student_model(x[sl], t[sl]), {**teacher, "image_features": teacher["image_features"][sl],
                                                   "text_features": teacher["text_features"][sl]})
        (sum(part.values()) / k).backward()
    assert not torch.allclose(student_model.image.weight.grad, full[0], atol=1e-6)
