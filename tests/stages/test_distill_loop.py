"""The distill loop's callbacks (`distill.Hooks`) and its non-finite loss guard, on demo-tiny (CPU, 7 steps)."""

import contextlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from funmatch import config
from funmatch.errors import TrainingError
from funmatch.stages import distill
from funmatch.storage.checkpoint import CheckpointManager

SHORT = ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0"]  # 7 steps


def _checkpoints(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in directory.glob("ckpt-*.json"))


def _nan_at(bad_step: int) -> distill.Hooks:
    """Hooks that make the teacher's targets NaN from `bad_step` (counted from 0) on."""
    return distill.Hooks(on_targets=lambda step, t: torch.full_like(t, float("nan")) if step >= bad_step else t)


def test_hooks_see_the_start_every_step_and_every_committed_checkpoint(tmp_path, dataset_dir, teacher_dir):
    cfg = config.load("demo-tiny", SHORT + ["distill.checkpoint_every_steps=3"])
    ck = tmp_path / "ck"
    events: list[tuple] = []
    hooks = distill.Hooks(
        on_start=lambda step, ckpt: events.append(("start", step, None if ckpt is None else ckpt.directory)),
        on_step=lambda step: events.append(("step", step)),
        on_checkpoint=lambda step, ckpt: events.append(
            ("saved", step, all(os.path.exists(f) for f in ckpt.files(step)))
        ),
    )
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s", checkpoint_dir=str(ck), hooks=hooks)
    assert events == (
        [("start", 0, str(ck))]
        + [("step", i) for i in range(3)]
        + [("saved", 3, True)]
        + [("step", i) for i in range(3, 6)]
        + [("saved", 6, True), ("step", 6), ("saved", 7, True)]
    )

    for path in CheckpointManager(str(ck), cfg.hash()).files(7):  # resume at step 6: one step left
        Path(path).unlink()
    events.clear()
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "again", checkpoint_dir=str(ck), hooks=hooks)
    assert events == [("start", 6, str(ck)), ("step", 6), ("saved", 7, True)]


def test_nan_loss_stops_before_the_next_checkpoint(tmp_path, dataset_dir, teacher_dir):
    """Checkpoints every 3 steps, no log before the end: the guard at checkpoint 6 finds step 5 bad."""
    cfg = config.load("demo-tiny", SHORT + ["distill.checkpoint_every_steps=3", "distill.log_every=100"])
    ck = tmp_path / "ck"
    with pytest.raises(TrainingError) as e:
        distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s", checkpoint_dir=str(ck), hooks=_nan_at(4))
    assert str(e.value) == f"distill: non-finite loss (nan) at step 5; the last good checkpoint is step 3 in {ck}"
    assert "\n" not in str(e.value)
    assert _checkpoints(ck) == [3] and json.loads((ck / "latest").read_text())["step"] == 3
    assert not (tmp_path / "s" / "model.json").exists()  # no student written


def test_nan_loss_stops_at_the_log_cadence(tmp_path, dataset_dir, teacher_dir):
    """Logs every 2 steps, checkpoints every 4: the log at step 4 finds step 3 bad, before checkpoint 4."""
    cfg = config.load("demo-tiny", SHORT + ["distill.checkpoint_every_steps=4", "distill.log_every=2"])
    ck = tmp_path / "ck"
    with pytest.raises(
        TrainingError, match=re.escape(f"non-finite loss (nan) at step 3; no checkpoint was written in {ck}")
    ):
        distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s", checkpoint_dir=str(ck), hooks=_nan_at(2))
    assert _checkpoints(ck) == []
    with pytest.raises(TrainingError, match="at step 1; no checkpoint directory was given"):
        distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s2", hooks=_nan_at(0))


def test_diverging_lr_is_stopped_and_never_checkpointed(tmp_path, dataset_dir, teacher_dir):
    """No hook: lr=1e30 blows the weights up within a few steps; every checkpoint left predates the bad step."""
    cfg = config.load("demo-tiny", SHORT + ["distill.lr=1e30", "distill.checkpoint_every_steps=1"])
    ck = tmp_path / "ck"
    with pytest.raises(TrainingError, match=r"non-finite (loss|gradient norm) \(\S+") as e:
        distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s", checkpoint_dir=str(ck))
    match = re.search(r"at step (\d+);", str(e.value))
    assert match, str(e.value)
    bad = int(match.group(1))
    assert _checkpoints(ck) == list(range(1, bad))
    if bad > 1:
        assert str(e.value).endswith(f"the last good checkpoint is step {bad - 1} in {ck}")
        state = CheckpointManager(str(ck), cfg.hash()).load_latest()
        assert state is not None
        assert all(torch.isfinite(t).all() for name, t in state.tensors.items() if name.startswith("model/"))


# ---------------------------------------------------------------- the paper's teaching variants


SMALL = ["data.max_train_per_class=30", "data.shard_size=128"]  # 300 train images in 3 shards


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """demo-tiny's data cut to 30 train images per class in shards of 128 (the teacher's classes)."""
    from funmatch.stages import prepare

    out = tmp_path_factory.mktemp("small-dataset")
    prepare.run(config.load("demo-tiny", SMALL), out)
    return out


def _tiny_teacher(teacher_dir, dataset_dir) -> tuple[distill._Teacher, torch.Tensor]:
    """The demo-tiny teacher (CPU) and the train split's uint8 images."""
    from funmatch.data import prepared

    images, _ = prepared.load_split(dataset_dir, "train")
    classes = prepared.read_manifest(dataset_dir)["classes"]
    return distill._Teacher(teacher_dir, classes, torch.device("cpu"), torch.contiguous_format), torch.from_numpy(
        images
    )


def _targets(setup, teacher, dataset_dir, extra=()):
    cfg = config.load("demo-tiny", [f"distill.setup={setup}", *SMALL, *extra])
    return cfg, teacher.fixed_targets(dataset_dir, cfg, torch.device("cpu"), contextlib.nullcontext())


def test_fixed_targets_per_variant(small_dataset, teacher_dir):
    """fix/cc: the central crop (eval view); fix/rs: the resized image; fix/ic_ens: t·log of the mean of the
    teacher's softmax(z/t) over K inception crops + flips, reproducible, K-dependent."""
    from funmatch.data import prepared
    from funmatch.recipe import augment
    from funmatch.stages.evaluate import predict

    teacher, images = _tiny_teacher(teacher_dir, small_dataset)
    cpu, amp = torch.device("cpu"), contextlib.nullcontext()
    cfg, cc = _targets("fix/cc", teacher, small_dataset)
    assert torch.allclose(cc, predict(teacher.members, images, teacher.resolutions, cfg.eval, cpu), atol=1e-5)
    assert config.canonical_setup("fixed") == "fix/cc"

    _, rs = _targets("fix/rs", teacher, small_dataset)
    resized = teacher([augment.resized_view(images, r) for r in teacher.views_of], amp)
    assert torch.allclose(rs, resized, atol=1e-4) and not torch.allclose(rs, cc, atol=1e-3)

    cfg, ens = _targets("fix/ic_ens", teacher, small_dataset, ["distill.ensemble_crops=3"])
    t, side, area = cfg.distill.temperature, images.shape[1], (cfg.distill.crop_min_area, cfg.distill.crop_max_area)
    train = prepared.ShardedImages(small_dataset, "train")
    assert len(train.counts) > 1  # the crops of each shard come from that shard's own generator
    crops: list[list[torch.Tensor]] = [[], [], []]  # per crop k, the teacher's probabilities, shard by shard
    for a, c in zip(train.starts[:-1], train.counts, strict=True):
        g = augment.step_generator(cfg.runtime.seed, int(a), stream=distill.ENSEMBLE_STREAM)
        x = augment.to_float_nchw(images[a : a + c])
        for k in range(3):
            boxes = augment.inception_boxes(int(c), side, side, area, g)
            flips = torch.rand(int(c), generator=g) < 0.5
            views = [
                augment.value_range(augment.flip(augment.crop_resize(x, boxes, r), flips)) for r in teacher.views_of
            ]
            crops[k].append(torch.softmax(teacher(views, amp) / t, -1))
    probs = [torch.cat(p) for p in crops]
    assert torch.allclose(torch.softmax(ens / t, -1), torch.stack(probs).mean(0), atol=1e-5)
    one = _targets("fix/ic_ens", teacher, small_dataset, ["distill.ensemble_crops=1"])[1]
    assert not torch.allclose(one, ens, atol=1e-3)
    assert torch.allclose(torch.softmax(one / t, -1), probs[0], atol=1e-5)  # K=1: crop 0's prediction, again


@pytest.mark.parametrize("setup", ["fix/rs", "fix/cc", "fix/ic_ens"])
def test_fixed_variants_fit_the_precomputed_targets_every_step(tmp_path, small_dataset, teacher_dir, setup):
    """A short run: each step's targets are the precomputed ones of that step's images, whatever the step."""
    from funmatch.data import prepared

    extra = [f"distill.setup={setup}", "distill.ensemble_crops=2", "distill.epochs=2", *SMALL]  # 10 steps
    cfg = config.load("demo-tiny", SHORT + extra)
    teacher, _ = _tiny_teacher(teacher_dir, small_dataset)
    fixed = teacher.fixed_targets(small_dataset, cfg, torch.device("cpu"), contextlib.nullcontext())
    seen: list[tuple[int, torch.Tensor]] = []

    def record(step: int, target: torch.Tensor) -> torch.Tensor:
        seen.append((step, target.clone()))
        return target

    hooks = distill.Hooks(on_targets=record)
    info = distill.run(cfg, small_dataset, teacher_dir, tmp_path / "s", hooks=hooks)
    n, k = len(fixed), cfg.distill
    assert info["setup"] == setup and len(seen) == info["steps"] > 1
    for step, target in seen:
        assert torch.allclose(target, fixed[prepared.batch_indices(step, k.batch_size, n, cfg.runtime.seed)], atol=1e-5)
    by_image: dict[int, torch.Tensor] = {}  # the second epoch sees every image again: the same target
    for step, target in seen:
        for i, row in zip(
            prepared.batch_indices(step, k.batch_size, n, cfg.runtime.seed).tolist(), target, strict=True
        ):
            assert torch.equal(by_image.setdefault(i, row), row)
    assert len(by_image) == n


@pytest.mark.parametrize("setup", ["ind/rc", "same/rc"])
def test_mild_random_crop_variants_run(tmp_path, small_dataset, teacher_dir, setup):
    """ind/rc and same/rc (the online variants new beside ind/ic, same/ic, funmatch) train end to end."""
    cfg = config.load("demo-tiny", SHORT + SMALL + [f"distill.setup={setup}", "distill.epochs=1"])
    info = distill.run(cfg, small_dataset, teacher_dir, tmp_path / "s")
    history = json.loads((tmp_path / "s" / "history.json").read_text())
    assert info["setup"] == setup and history and all(math.isfinite(h["loss"]) for h in history)
