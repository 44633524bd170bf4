"""evaluate's minitrain: a seeded, class-stratified sample of the train split, not its first rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from funmatch.config import Config
from funmatch.data import prepared
from funmatch.stages import evaluate

COUNTS = (300, 200, 100, 60, 40)  # 700 images, class-sorted as some sources store them


def _class_sorted_dataset(root: Path, encoding: str = "raw") -> Path:
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    images[..., 0] = labels[:, None, None] * 40  # each image shows its class in the red channel
    images[..., 1], images[..., 2] = (np.arange(len(labels))[:, None, None] >> k & 255 for k in (0, 8))  # row
    entry = prepared.write_split(
        root, "train", images, labels, shard_size=128, num_classes=len(COUNTS), encoding=encoding
    )
    manifest = {
        "format": prepared.FORMAT,
        "encoding": encoding,
        "stored_resolution": 8,
        "classes": [f"c{i}" for i in range(len(COUNTS))],
        "splits": {"train": entry},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cfg(size: int, seed: int = 0) -> Config:
    cfg = Config()
    cfg.eval.minitrain_size, cfg.data.split_seed = size, seed
    return cfg


def test_minitrain_holds_every_class_in_proportion(tmp_path):
    root = _class_sorted_dataset(tmp_path)
    images, labels = evaluate.minitrain(_cfg(70), root)
    assert np.bincount(labels, minlength=len(COUNTS)).tolist() == [30, 20, 10, 6, 4]  # 10 % of each class
    assert (images[:, 0, 0, 0] == labels * 40).all()  # each image comes with its own label
    # drawn from across each class, not its first rows
    rows = images[:, 0, 0, 1].astype(np.int64) + 256 * images[:, 0, 0, 2].astype(np.int64)
    assert len(np.unique(rows)) == 70 and rows[labels == 0].max() > 150 and rows[labels == 4].min() < 680


def test_minitrain_rounds_shares_to_the_exact_size():
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    for size in (1, 7, 33, 512, 699):
        idx = prepared.stratified_sample(labels, size, seed=3)
        share = np.bincount(labels[idx], minlength=len(COUNTS))
        assert len(idx) == len(np.unique(idx)) == size
        assert (np.abs(share - size * np.array(COUNTS) / len(labels)) < 1).all()  # largest remainder
    assert np.array_equal(prepared.stratified_sample(labels, 5000, seed=0), np.arange(len(labels)))


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_minitrain_is_the_same_for_the_same_seed(tmp_path, encoding):
    root = _class_sorted_dataset(tmp_path, encoding)
    a_images, a_labels = evaluate.minitrain(_cfg(50, seed=1), root)
    b_images, b_labels = evaluate.minitrain(_cfg(50, seed=1), root)
    _, c_labels = evaluate.minitrain(_cfg(50, seed=2), root)
    c_idx = prepared.stratified_sample(prepared.load_labels(root, "train"), 50, seed=2)
    a_idx = prepared.stratified_sample(prepared.load_labels(root, "train"), 50, seed=1)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert np.array_equal(np.sort(a_labels), np.sort(c_labels)) and not np.array_equal(a_idx, c_idx)
