"""Defaults derived for a user's folder: the distillation budget by train-set size (distill.epochs=0, capped by
distill.max_images), the stored side from the views (data.stored_resolution=0) and the preset a command takes
without --preset."""

import dataclasses
import math

import pytest

from funmatch import config
from funmatch.errors import ConfigError


@pytest.mark.parametrize(
    "train_size, low, high",
    [
        (1_020, 9_000, 10_000),  # Flowers102: the paper's shortest budget is 10,000 epochs
        (3_312, 1_000, 3_100),  # Pets: 1,000 (fast) to 3,000 (medium) epochs
        (68_175, 100, 1_000),  # Food101: 100 (fast) to 1,000 (medium)
        (76_128, 100, 1_000),  # SUN397: 100 (fast) to 1,000 (medium)
        (1_255_743, 100, 100),  # ImageNet train[:98%]: the 100-epoch floor
        (40, 10_000, 10_000),  # a few dozen images: the 10,000-epoch ceiling
    ],
)
def test_patient_epochs_follow_the_papers_budgets_by_size(train_size, low, high):
    epochs = config.patient_epochs(train_size)
    assert low <= epochs <= high
    if low < epochs < high:  # inside the clamp: ten million images seen
        assert epochs * train_size == pytest.approx(config.PATIENT_IMAGES)


def test_patient_epochs_shrink_as_the_train_set_grows():
    sizes = [10, 100, 1_000, 5_000, 50_000, 500_000, 5_000_000]
    epochs = [config.patient_epochs(n) for n in sizes]
    assert epochs == sorted(epochs, reverse=True)
    images = [e * n for e, n in zip(epochs, sizes, strict=True)]
    assert images == sorted(images)  # more data: at least as many images seen


@pytest.mark.parametrize("preset", [p for p in config.preset_names() if config.load(p).distill.epochs > 0])
def test_a_given_budget_is_unchanged(preset):
    """distill.epochs > 0 and no cap: ceil(epochs x n / batch) steps and the preset's warmup, as before."""
    cfg = config.load(preset)
    n = cfg.expected.train_size or 1000
    budget = config.distill_budget(cfg.distill, n)
    assert budget.steps == max(1, math.ceil(cfg.distill.epochs * n / cfg.distill.batch_size))
    assert budget.warmup == cfg.distill.warmup_steps and budget.how == f"distill.epochs={cfg.distill.epochs:g}"


def test_derived_budget_is_capped_by_max_images_with_a_short_warmup():
    k = dataclasses.replace(config.DistillConfig(), epochs=0, batch_size=128, warmup_steps=50, max_images=96_000)
    budget = config.distill_budget(k, 1_392)
    assert budget.steps == 750 and budget.warmup == 50  # 96,000 / 128; 50 < 750 / 10
    assert budget.epochs == pytest.approx(750 * 128 / 1_392)
    assert "derived from 1392 train images" in budget.how and "capped by distill.max_images=96,000" in budget.how
    uncapped = config.distill_budget(dataclasses.replace(k, max_images=0), 1_392)
    assert uncapped.steps == math.ceil(config.patient_epochs(1_392) * 1_392 / 128) and uncapped.warmup == 50
    tiny = config.distill_budget(dataclasses.replace(k, max_images=2_560), 1_392)
    assert (tiny.steps, tiny.warmup) == (20, 2)  # the warmup stays under a tenth of the steps


def test_stored_side_serves_the_largest_view_of_a_4_3_image():
    cfg = config.load("folder", ["data.source=/some/folder"])
    assert (cfg.teacher.resolution, cfg.eval.crop_pct) == (64, 0.875)
    # 4/3 x 64 / 0.875 = 97.5 -> 98 -> 104 (a multiple of 8): a 4:3 image's short side is 78 >= 64 / 0.875
    assert cfg.data.stored_resolution == 104 == config.stored_side(cfg)
    assert 104 * 3 / 4 >= 64 / 0.875
    bigger = config.load("folder", ["teacher.resolution=96", "distill.extra_students=bit-r14-mini@128"])
    assert bigger.data.stored_resolution == 200  # ceil(4/3 x 128 / 0.875) = 196 -> 200
    given = config.load("folder", ["data.stored_resolution=72"])
    assert given.data.stored_resolution == 72  # a value given stays
    again = config.from_json(cfg.to_json())  # the components get the derived side
    assert again.data.stored_resolution == 104 and again.hash() == cfg.hash()


def test_new_keys_keep_existing_hashes_and_are_checked():
    assert config.load("demo").hash() == "90e0d32619910747"  # the README's demo config, from before these keys
    assert config.load("demo", ["distill.max_images=0"]).hash() == config.load("demo").hash()
    assert config.load("demo", ["distill.max_images=1000"]).hash() != config.load("demo").hash()
    with pytest.raises(ConfigError, match=r"distill.epochs=-1.0 .*0 \(derived from the train-set size\)"):
        config.load("demo", ["distill.epochs=-1"])
    with pytest.raises(ConfigError, match=r"distill.max_images=-5 .*0 \(no cap\)"):
        config.load("demo", ["distill.max_images=-5"])
    with pytest.raises(ConfigError, match=r"data.stored_resolution=-8 .*0 in a preset or --set: derived"):
        config.load("demo", ["data.stored_resolution=-8"])


def test_folder_preset_is_a_cpu_config_with_a_derived_budget():
    cfg = config.load("folder", ["data.source=/some/folder"])
    assert cfg.resources.accelerator_count == 0 and cfg.runtime.device == "cpu"
    assert cfg.distill.epochs == 0 and cfg.distill.max_images > 0 and config.gpu_hours(cfg) == 0
    assert cfg.teacher.init == "none" and cfg.gate.min_teacher_ratio == 0.9  # the default gate
    assert "folder" in config.describe_presets()


@pytest.mark.parametrize(
    "overrides, preset",
    [
        ([], "demo"),
        (["distill.epochs=3"], "demo"),
        (["data.source=demo"], "demo"),
        (["data.source=pets", "data.root=/data"], "demo"),
        (["data.source=/home/me/photos"], "folder"),
        (["data.source=gs://bucket/photos"], "folder"),
        (["data.source=photos.tar.gz"], "folder"),
        (["data.source=/home/me/photos", "data.source=demo"], "demo"),  # the last --set wins
    ],
)
def test_default_preset_follows_data_source(overrides, preset):
    chosen, why = config.default_preset(overrides)
    assert chosen == preset
    assert (preset == "folder") == bool(why) and (not why or "--preset demo" in why)
