"""A teacher trained from scratch on a small train split says, in one log line, that the recipe assumes a
pretrained one and how to pass it; a teacher nearer chance than perfect says what to change."""

import logging

from funmatch import config
from funmatch.data import prepared
from funmatch.stages import finetune


def test_scratch_teacher_run_logs_the_note(tmp_path, dataset_dir, caplog):
    cfg = config.load("demo-tiny", ["finetune.steps=2"])  # two steps: a teacher near chance
    with caplog.at_level(logging.WARNING, logger=finetune.log.name):
        info = finetune.run(cfg, dataset_dir, tmp_path / "teacher")
    n = prepared.read_manifest(dataset_dir)["splits"]["train"]["count"]
    notes = [r.getMessage() for r in caplog.records if "trained from scratch" in r.getMessage()]
    assert len(notes) == 1 and notes[0] == config.scratch_teacher_note(cfg, n)
    assert f"on {n} images" in notes[0] and "--set teacher.init=<file> teacher.finetune=false" in notes[0]
    weak = [r.getMessage() for r in caplog.records if "nearer chance" in r.getMessage()]
    assert info["val_prec1"] < (1 + 1 / 10) / 2 and len(weak) == 1  # 10 classes: below 0.55 is nearer chance
    assert f"teacher val prec@1 {info['val_prec1']:.4f}" in weak[0] and "teacher.resolution=64" in weak[0]


def test_scratch_note_only_for_a_small_split_without_a_given_teacher():
    scratch = config.load("demo")
    assert "trained from scratch on 1392 images" in config.scratch_teacher_note(scratch, 1392)
    assert "trained from scratch (teacher.init=none)" in config.scratch_teacher_note(scratch)  # size not known yet
    assert config.scratch_teacher_note(scratch, config.SMALL_TRAIN) == ""  # HyperRule's larger buckets
    given = config.load("demo", ["teacher.init=/t.npz"])  # a BiT .npz to fine-tune
    assert config.scratch_teacher_note(given, 1392) == ""


def test_weak_teacher_note_is_about_chance():
    cfg = config.load("folder")
    assert finetune.weak_teacher_note(cfg, 0.60, 6) == ""  # 0.60 >= (1 + 1/6) / 2 = 0.583
    note = finetune.weak_teacher_note(cfg, 0.55, 6)
    assert "teacher val prec@1 0.5500 is nearer chance (0.17) than 1" in note
    assert "teacher.init=<file>" in note and "finetune.steps=" in note
    given = config.load("folder", ["teacher.init=/t.npz"])
    assert "teacher.init" not in finetune.weak_teacher_note(given, 0.3, 6)
