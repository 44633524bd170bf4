"""The distill loop's callbacks (`distill.Hooks`) and its non-finite loss guard, on demo-tiny (CPU, 7 steps)."""

import json
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
