import pytest
import torch

from funmatch.recipe import augment


def _images(n=16, size=40):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_inception_boxes_in_range_with_uniform_aspect_ratio():
    """Ranges and the aspect-ratio law; the full distribution is checked in test_tf_sampler.py."""
    g = augment.step_generator(0, 0)
    boxes = augment.inception_boxes(4000, 64, 48, (0.05, 1.0), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (64 * 48)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()
    assert (boxes == boxes.round()).all()  # integer pixel corners
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 1.0
    fitted = area < 0.999  # the fallback is the whole image
    ratio = (w / h)[fitted]
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4  # 3/4..4/3 up to rounding
    # uniform, not log-uniform, aspect ratio: the mean of U(0.75, 1.33) is 1.04 (log-uniform: 1.012);
    # small crops of a square image always fit, so no attempt is rejected
    small = augment.inception_boxes(20000, 256, 256, (0.05, 0.3), g)
    r = (small[:, 2] - small[:, 0]) / (small[:, 3] - small[:, 1])
    assert r.mean().item() == pytest.approx(sum(augment.ASPECT_RANGE) / 2, abs=0.006)


def test_crop_resize_full_box_at_same_size_is_identity_and_no_antialias():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0, 8, 8]] * 2)
    assert torch.allclose(augment.crop_resize(x, full, 8), x, atol=1e-6)
    # 2x downscale without antialiasing samples between pixel pairs (bilinear, half-pixel centres)
    down = augment.crop_resize(x, full, 4)
    want = x.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    assert torch.allclose(down, want, atol=1e-6)


def test_mixup_folds_coefficient_and_rolls_by_one():
    coeffs = [augment.mixup_coefficient(augment.step_generator(0, s)) for s in range(200)]
    assert min(coeffs) >= 0.5 and max(coeffs) <= 1.0
    x = torch.arange(3.0)[:, None]
    assert torch.allclose(augment.mixup(x, 0.75), 0.75 * x + 0.25 * torch.tensor([[2.0], [0.0], [1.0]]))


def test_value_range():
    assert augment.value_range(torch.tensor([0.0, 127.5, 255.0])).tolist() == [-1.0, 0.0, 1.0]


def _smooth_images(n=16, size=40):
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255
    fine = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True)
    return fine.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _views(setup, t_res=32, s_res=32, images=None):
    images = _images() if images is None else images
    teachers, student = augment.distill_views(images, setup, t_res, s_res, (0.05, 1.0), augment.step_generator(1, 2))
    return (teachers[0] if teachers else None), student


def test_consistent_and_funmatch_give_both_models_the_same_view():
    for setup in ("consistent", "funmatch"):
        t, s = _views(setup)
        assert torch.equal(t, s)


def test_same_crop_resized_per_model_resolution():
    t, s = _views("funmatch", 48, 24, _smooth_images())
    assert t.shape[-1] == 48 and s.shape[-1] == 24
    down = torch.nn.functional.interpolate(t, size=24, mode="bilinear", antialias=True)
    assert (down - s).abs().mean() < 0.05  # the same content at two sizes
    t_ind, s_ind = _views("independent", 48, 24, _smooth_images())
    down = torch.nn.functional.interpolate(t_ind, size=24, mode="bilinear", antialias=True)
    assert (down - s_ind).abs().mean() > 0.2


def test_independent_views_differ_and_fixed_has_no_teacher_view():
    t, s = _views("independent")
    assert not torch.equal(t, s)
    t, s = _views("fixed")
    assert t is None and s.shape == (16, 3, 32, 32)


def test_funmatch_is_consistent_plus_mixup():
    tc, _ = _views("consistent")
    tf, _ = _views("funmatch")
    assert not torch.equal(tc, tf)
    a = augment.mixup_coefficient(_coefficient_generator())
    assert torch.allclose(tf, augment.mixup(tc, a), atol=1e-5)


def _coefficient_generator():
    """The generator state right after the consistent view's crop and flip draws."""
    g = augment.step_generator(1, 2)
    augment.inception_boxes(16, 40, 40, (0.05, 1.0), g)
    torch.rand(16, generator=g)
    return g


def test_same_step_same_views_other_step_other_views():
    a, b = _views("funmatch"), _views("funmatch")
    assert torch.equal(a[1], b[1])
    other = augment.distill_views(_images(), "funmatch", 32, 32, (0.05, 1.0), augment.step_generator(1, 3))
    assert not torch.equal(a[1], other[1])


def test_ensemble_teachers_get_the_same_crop_at_their_own_resolutions():
    teachers, s = augment.distill_views(
        _smooth_images(size=64), "funmatch", (64, 32), 32, (0.05, 1.0), augment.step_generator(1, 2)
    )
    assert teachers is not None
    t384, t224 = teachers
    assert t384.shape[-1] == 64 and t224.shape[-1] == 32 and torch.equal(t224, s)


def test_eval_view_is_resize_then_central_crop():
    x = _images(2, 40)
    v = augment.eval_view(x, 32, 0.8)
    assert v.shape == (2, 3, 32, 32) and v.min() >= -1 and v.max() <= 1
    assert torch.allclose(augment.eval_view(x, 40, 1.0), augment.value_range(augment.to_float_nchw(x)))


@pytest.mark.parametrize("setup", ["funmatch", "independent", "fixed"])
def test_sharded_views_are_slices_of_the_global_batch(setup):
    """Each DDP rank makes its slice with exactly the single-process randomness and mixup neighbour."""
    images = _images(12)
    full_t, full_s = augment.distill_views(images, setup, (32, 16), 24, (0.05, 1.0), augment.step_generator(5, 9))
    for rank in range(3):
        t, s = augment.distill_views(
            images, setup, (32, 16), 24, (0.05, 1.0), augment.step_generator(5, 9), shard=(rank, 3)
        )
        part = slice(rank * 4, rank * 4 + 4)
        assert torch.allclose(s, full_s[part], atol=1e-5)
        if setup != "fixed":
            assert t is not None and full_t is not None
            assert all(torch.allclose(a, b[part], atol=1e-5) for a, b in zip(t, full_t, strict=True))


ALL_SETUPS = ("fix/rs", "fix/cc", "fix/ic_ens", "ind/rc", "ind/ic", "same/rc", "same/ic", "funmatch", "consistent")


@pytest.mark.parametrize("setup", ALL_SETUPS)
def test_every_variant_shards_to_slices_of_the_global_batch(setup):
    """Every teaching variant, two students and two teacher resolutions: each of 3 ranks, given the global
    batch or only its shard rows, makes exactly its slice of the single-process views."""
    images = _images(12)
    g = augment.step_generator(5, 9)
    full_t, full_s = augment.distill_views(images, setup, (32, 16), [24, 20], (0.05, 1.0), g)
    assert (full_t is None) == setup.startswith("fix/")
    for rank in range(3):
        rows = augment.shard_rows(12, setup, (rank, 3))
        for given in (images, images[rows]):
            t, s = augment.distill_views(
                given, setup, (32, 16), [24, 20], (0.05, 1.0), augment.step_generator(5, 9), (rank, 3), 12
            )
            part = slice(rank * 4, rank * 4 + 4)
            assert all(torch.allclose(a, b[part], atol=1e-5) for a, b in zip(s, full_s, strict=True))
            assert (t is None) == (full_t is None)
            if t is not None and full_t is not None:
                assert all(torch.allclose(a, b[part], atol=1e-5) for a, b in zip(t, full_t, strict=True))


@pytest.mark.parametrize("setup", ["ind/rc", "same/rc", "fix/cc"])
def test_mild_crop_variants_do_not_change_with_crop_area(setup):
    """The inception area range does not affect mild random crops; crop_pct does."""
    a = augment.distill_views(_images(), setup, 32, 32, (0.05, 1.0), augment.step_generator(1, 2))[1]
    b = augment.distill_views(_images(), setup, 32, 32, (0.5, 0.6), augment.step_generator(1, 2))[1]
    c = augment.distill_views(_images(), setup, 32, 32, (0.05, 1.0), augment.step_generator(1, 2), crop_pct=0.9)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
