"""What the teacher and the student see in each teaching variant of the paper (Fig. 3 / App. C, recipe.md §1).

The images encode their own pixel coordinates (red = 3x + 10, green = 3y + 10), so a view tells which
part of the image it sampled: the crop's extent, whether it is flipped, whether two views are one crop.
"""

import pytest
import torch

from funmatch import config
from funmatch.errors import ConfigError
from funmatch.recipe import augment

SIZE, RES, CROP_PCT, AREA = 64, 32, 0.8, (0.05, 1.0)


def _coordinate_images(n: int = 16, size: int = SIZE) -> torch.Tensor:
    """n identical NHWC uint8 images whose red/green channels are 3·x + 10 / 3·y + 10."""
    ramp = torch.arange(size, dtype=torch.float32) * 3 + 10
    img = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 128.0)])
    return img.permute(1, 2, 0).to(torch.uint8).expand(n, size, size, 3).contiguous()


def _coords(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) image coordinates each pixel of an N×3×H×W view in [-1, 1] sampled."""
    pixels = (view + 1) * 127.5
    return (pixels[:, 0] - 10) / 3, (pixels[:, 1] - 10) / 3


def _extent(view: torch.Tensor) -> torch.Tensor:
    """Per image (x span, y span) of the sampled coordinates, as a fraction of the image side."""
    x, y = _coords(view)
    return torch.stack([x.amax((1, 2)) - x.amin((1, 2)), y.amax((1, 2)) - y.amin((1, 2))], 1) / (SIZE - 1)


def _flipped(view: torch.Tensor) -> torch.Tensor:
    """Per image: whether x decreases along the row (a horizontal flip)."""
    x, _ = _coords(view)
    return x[:, :, 0].mean(1) > x[:, :, -1].mean(1)


def _views(setup: str, step: int = 2, t_res: int = RES, s_res: int = RES):
    images = _coordinate_images()
    teachers, student = augment.distill_views(
        images, setup, t_res, s_res, AREA, augment.step_generator(1, step), crop_pct=CROP_PCT
    )
    return (teachers[0] if teachers else None), student


def _is_mild_crop(view: torch.Tensor) -> bool:
    """Each image's view spans crop_pct of both sides (resize(H)|random_crop(L), L/H = crop_pct)."""
    span = _extent(view)
    expected = CROP_PCT * SIZE * (RES - 1) / RES / (SIZE - 1)  # first to last sample point
    return bool(torch.allclose(span, torch.full_like(span, expected), atol=0.02))


def test_every_variant_and_alias_is_a_valid_setup():
    for setup in (*config.VARIANTS, *config.SETUP_ALIASES):
        assert config.load("demo-tiny", [f"distill.setup={setup}"]).distill.setup == setup
    with pytest.raises(ConfigError, match="distill.setup"):
        config.load("demo-tiny", ["distill.setup=fix/xx"])
    assert config.canonical_setup("fixed") == "fix/cc"
    assert config.canonical_setup("independent") == "ind/ic"
    assert config.canonical_setup("consistent") == "same/ic"
    with pytest.raises(ConfigError, match="ensemble_crops"):
        config.load("demo-tiny", ["distill.ensemble_crops=0"])


def test_ensemble_crops_at_its_default_keeps_the_config_hash():
    base = config.load("demo-tiny")
    assert base.distill.ensemble_crops == 1000
    assert config.load("demo-tiny", ["distill.ensemble_crops=1000"]).hash() == base.hash()
    assert config.load("demo-tiny", ["distill.ensemble_crops=8"]).hash() != base.hash()


def test_mild_crop_boxes_are_resize_then_random_crop():
    """The box is an L×L window at an integer offset of the image resized to round(L / crop_pct)."""
    boxes = augment.mild_crop_boxes(500, 48, 64, 32, 0.8, torch.Generator().manual_seed(0))
    big = 40
    assert torch.allclose(boxes[:, 2] - boxes[:, 0], torch.full((500,), 32 * 64 / big))
    assert torch.allclose(boxes[:, 3] - boxes[:, 1], torch.full((500,), 32 * 48 / big))
    offsets = torch.stack([boxes[:, 0] * big / 64, boxes[:, 1] * big / 48], 1)
    assert torch.allclose(offsets, offsets.round(), atol=1e-4)
    assert offsets.min() == 0 and offsets.max() == big - 32  # every offset of [0, H - L] is drawn
    assert len(offsets[:, 0].round().unique()) == big - 32 + 1


def test_mild_crop_view_equals_resize_then_crop():
    """crop_resize of a mild box samples exactly what big_vision's resize(H) then random_crop(L) give."""
    images = _coordinate_images(4)
    boxes = augment.mild_crop_boxes(4, SIZE, SIZE, RES, CROP_PCT, torch.Generator().manual_seed(3))
    view = augment.crop_resize(augment.to_float_nchw(images), boxes, RES)
    big = round(RES / CROP_PCT)
    resized = torch.nn.functional.interpolate(
        augment.to_float_nchw(images), size=(big, big), mode="bilinear", align_corners=False, antialias=False
    )
    for i, (x0, y0) in enumerate((boxes[:, :2] * big / SIZE).round().long().tolist()):
        assert torch.allclose(view[i], resized[i, :, y0 : y0 + RES, x0 : x0 + RES], atol=1e-3)


def test_fix_rs_student_sees_the_whole_image_resized_and_nothing_random():
    t, s = _views("fix/rs")
    assert t is None
    assert torch.allclose(s, augment.resized_view(_coordinate_images(), RES))
    assert torch.allclose(_extent(s), torch.full((16, 2), (SIZE - SIZE / RES) / (SIZE - 1)), atol=1e-3)
    assert not _flipped(s).any()
    assert torch.equal(s, _views("fix/rs", step=7)[1])  # the same view at every step


@pytest.mark.parametrize("setup", ["fix/cc", "fixed"])
def test_fix_cc_student_gets_mild_random_crops(setup):
    t, s = _views(setup)
    assert t is None and _is_mild_crop(s)
    x, y = _coords(s)
    assert len(x[:, 0, 0].round().unique()) > 3 and len(y[:, 0, 0].round().unique()) > 3  # offsets vary
    assert 0 < _flipped(s).sum() < 16
    assert not torch.equal(s, _views(setup, step=7)[1])


def test_fix_ic_ens_student_gets_inception_crops():
    t, s = _views("fix/ic_ens")
    assert t is None
    area = _extent(s).prod(1)
    assert area.max() - area.min() > 0.3  # crop areas vary widely (5-100 % of the image)


def test_ind_rc_two_independent_mild_crops():
    t, s = _views("ind/rc")
    assert t is not None and _is_mild_crop(t) and _is_mild_crop(s)
    xt, yt = _coords(t)
    xs, ys = _coords(s)
    assert not torch.allclose(xt, xs, atol=0.5) and not torch.allclose(yt, ys, atol=0.5)


def test_ind_ic_two_independent_inception_crops():
    for setup in ("ind/ic", "independent"):
        t, s = _views(setup)
        assert t is not None
        assert (_extent(t) - _extent(s)).abs().amax(1).gt(0.05).float().mean() > 0.5  # mostly other crops


@pytest.mark.parametrize("setup", ["same/rc", "same/ic", "consistent"])
def test_same_one_crop_for_both(setup):
    t, s = _views(setup)
    assert t is not None and torch.equal(t, s)
    if setup == "same/rc":
        assert _is_mild_crop(s)
    else:
        area = _extent(s).prod(1)
        assert area.max() - area.min() > 0.3


def test_same_rc_teacher_at_its_own_resolution_sees_the_same_window():
    t, s = _views("same/rc", t_res=48, s_res=RES)
    xt, yt = _coords(t)
    xs, ys = _coords(s)
    for a, b in ((xt, xs), (yt, ys)):  # the same first-to-last range at both sizes, up to the sample spacing
        lo_t, hi_t = a.amin((1, 2)), a.amax((1, 2))
        lo_s, hi_s = b.amin((1, 2)), b.amax((1, 2))
        assert torch.allclose((lo_t + hi_t) / 2, (lo_s + hi_s) / 2, atol=1e-2)


def test_funmatch_is_same_ic_plus_mixup():
    tc, _ = _views("same/ic")
    tf, sf = _views("funmatch")
    assert torch.equal(tf, sf) and not torch.equal(tc, tf)
    g = augment.step_generator(1, 2)
    augment.inception_boxes(16, SIZE, SIZE, AREA, g)
    torch.rand(16, generator=g)
    assert torch.allclose(tf, augment.mixup(tc, augment.mixup_coefficient(g)), atol=1e-5)


def test_crop_kind_per_variant():
    kinds = {v: augment.crop_kind(v) for v in (*config.VARIANTS, *config.SETUP_ALIASES)}
    assert kinds == {
        "fix/rs": "rs",
        "fix/cc": "rc",
        "fix/ic_ens": "ic",
        "ind/rc": "rc",
        "ind/ic": "ic",
        "same/rc": "rc",
        "same/ic": "ic",
        "funmatch": "ic",
        "fixed": "rc",
        "independent": "ic",
        "consistent": "ic",
    }
