"""The paper's splits: the shipped TFDS SUN397 lists (counts, no overlap, checksums against PROVENANCE) and
every named dataset cut as big_vision's configs/proj/distill/*.py cut it in TFDS."""

import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from funmatch.data import sources, splits
from funmatch.errors import DataError

SPLITS_DIR = Path(str(resources.files("funmatch.data.splits")))


def _tfds_rank(keys, split="train"):
    """TFDS stores a split sorted by md5(split name + example key) (tensorflow_datasets core/hashing.py,
    salt = split name): written out here, independently of funmatch.data.splits.tfds_order."""
    return sorted(keys, key=lambda k: int(hashlib.md5(split.encode() + k.encode()).hexdigest(), 16))


# ---------------------------------------------------------------- the shipped files


def test_sun397_lists_have_tfds_counts_and_no_overlap():
    lists = splits.sun397_lists()
    assert {s: len(v) for s, v in lists.items()} == {"train": 76_128, "val": 10_875, "test": 21_750}
    sets = {s: set(v) for s, v in lists.items()}
    assert sum(len(v) for v in sets.values()) == 108_753  # no duplicates inside a list
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    labels = splits.sun397_labels()
    assert len(labels) == 397 == len(set(labels)) and labels == sorted(labels)
    assert {f.rsplit("/", 1)[0] for v in lists.values() for f in v} == set(labels)  # every class in the lists


def test_shipped_files_match_provenance():
    text = (SPLITS_DIR / "PROVENANCE").read_text()
    assert "tensorflow_datasets-4.9.10-py3-none-any.whl" in text and "Apache-2.0" in text
    recorded = {
        line.split()[0]: line.split()[-1]
        for line in text.splitlines()
        if line.split() and (SPLITS_DIR / line.split()[0]).is_file() and line.split()[0] != "PROVENANCE"
    }
    shipped = sorted(p.name for p in SPLITS_DIR.iterdir() if p.name.endswith((".txt", ".txt.gz")))
    assert sorted(recorded) == shipped and len(shipped) == 5
    for name, sha in recorded.items():
        data = (SPLITS_DIR / name).read_bytes()
        if name.endswith(".gz"):
            assert data[3] & 0x08 == 0 and data[4:8] == b"\0\0\0\0"  # gzip -n: no name, no time stamp
            data = gzip.decompress(data)
        assert hashlib.sha256(data).hexdigest() == sha, name


def test_food101_labels_are_tfds_order_not_sorted():
    labels = splits.food101_labels()
    assert len(labels) == 101 and labels[16:18] == ["cheesecake", "cheese_plate"]
    assert sorted(labels)[16:18] == ["cheese_plate", "cheesecake"]  # what sorted(meta) gave before


def test_tfds_slice_rounds_like_tfds():
    assert splits.tfds_slice(3680, 90) == 3312  # Pets train[:90%]
    assert splits.tfds_slice(75_750, 90) == 68_175  # Food101 train[:90%]
    assert splits.tfds_slice(1_281_167, 98) == 1_255_544  # ImageNet train[:98%]
    assert splits.tfds_slice(1_281_167, 99) == 1_268_355  # bit_i1k minival train[99%:]
    assert (splits.tfds_slice(5, 50), splits.tfds_slice(15, 50)) == (2, 8)  # Python's round: ties to even


def test_tfds_order_is_md5_of_split_and_key():
    keys = ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "beagle_1.jpg", "n01440764_10026.JPEG", "apple_pie/1005649"]
    assert [keys[i] for i in splits.tfds_order(keys, "train")] == _tfds_rank(keys)
    assert splits.tfds_order(keys, "train") == [0, 2, 3, 4, 1]  # pinned
    assert splits.tfds_order(keys, "test") != splits.tfds_order(keys, "train")  # the split name salts the hash


# ---------------------------------------------------------------- SUN397: TFDS's lists


def _sun_tree(root):
    """A handful of real SUN397 files, laid out like the archive: root/SUN397/<letter>/<class...>/sun_*.jpg."""
    lists = splits.sun397_lists()
    deep = next(f for f in lists["train"] if f.count("/") == 4)  # a two-level class, /c/car_interior/backseat
    chosen = {"train": [lists["train"][0], deep], "val": lists["val"][:2], "test": lists["test"][-2:]}
    for f in [*(f for v in chosen.values() for f in v), "/a/abbey/sun_notinanylist.jpg"]:
        path = root / "SUN397" / f.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"jpeg")
    (root / "SUN397" / "ClassName.txt").write_text("/a/abbey\n")  # torchvision's file: not read
    return chosen


def test_sun397_assigns_each_file_its_tfds_split_and_class(tmp_path):
    chosen = _sun_tree(tmp_path)
    src = sources.named_source("sun397", str(tmp_path), False)
    labels = splits.sun397_labels()
    assert len(src.classes) == 397 and src.classes[0] == "abbey"
    assert src.classes[labels.index("/c/car_interior/backseat")] == "c/car_interior/backseat"  # naming kept
    assert {s: len(v) for s, v in src.files.items()} == {"train": 76_128, "val": 10_875, "test": 21_750}
    for split, names in chosen.items():
        for f in names:
            path = str(tmp_path / "SUN397" / f.lstrip("/"))
            assert [(p, label) for p, label in src.files[split] if p == path] == [
                (path, labels.index(f.rsplit("/", 1)[0]))
            ]
            assert all(path not in (p for p, _ in src.files[other]) for other in src.files if other != split)
    assert not any("sun_notinanylist" in p for v in src.files.values() for p, _ in v)  # outside the lists
    # listed files the copy lacks: named (how many, the first few) and left to decode to report as unreadable
    assert "108747 listed file(s) missing" in src.description


def test_sun397_copy_without_any_listed_image_is_one_clear_line(tmp_path):
    (tmp_path / "SUN397" / "a" / "abbey").mkdir(parents=True)
    with pytest.raises(DataError, match=r"none of TFDS's 108753 SUN397 images is below .*SUN397") as e:
        sources.named_source("sun397", str(tmp_path), False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- percent slices in TFDS order


def test_pets_train_90_percent_in_tfds_order(tmp_path):
    base = tmp_path / "oxford-iiit-pet" / "annotations"
    base.mkdir(parents=True)
    trainval = [f"{breed}_{i} {c} 1 1" for c, breed in ((1, "Abyssinian"), (2, "beagle")) for i in range(1, 11)]
    base.joinpath("trainval.txt").write_text("\n".join(trainval) + "\n")
    base.joinpath("test.txt").write_text("Abyssinian_99 1 1 1\nbeagle_99 2 1 1\n")
    src = sources.named_source("pets", str(tmp_path), False)
    ranked = _tfds_rank([f"{row.split()[0]}.jpg" for row in trainval])  # TFDS key: '<image id>.jpg'
    name = lambda pairs: [Path(p).name for p, _ in pairs]  # noqa: E731
    assert sorted(name(src.files["train"])) == sorted(ranked[:18])  # train[:90%] of 20
    assert sorted(name(src.files["val"])) == sorted(ranked[18:])  # train[90%:]
    assert name(src.files["test"]) == ["Abyssinian_99.jpg", "beagle_99.jpg"]
    assert src.classes == ["Abyssinian", "beagle"]


def _food_tree(root, classes):
    meta = root / "food-101" / "meta"
    meta.mkdir(parents=True)
    train = {c: [f"{c}/{i}" for i in range(3)] for c in classes}
    meta.joinpath("train.json").write_text(json.dumps(train))
    meta.joinpath("test.json").write_text(json.dumps({c: [f"{c}/9"] for c in classes}))
    return [k for v in train.values() for k in v]


def test_food101_tfds_classes_and_train_90_percent(tmp_path):
    keys = _food_tree(tmp_path, sorted(splits.food101_labels()))
    src = sources.named_source("food101", str(tmp_path), False)
    assert src.classes == splits.food101_labels()
    rel = lambda p: p.split("images/", 1)[1].removesuffix(".jpg")  # noqa: E731
    labels = {rel(p): y for v in src.files.values() for p, y in v}
    assert labels["cheesecake/0"] == 16 and labels["cheese_plate/0"] == 17  # the released teacher's head order
    ranked = _tfds_rank(keys)  # TFDS key: '<class>/<id>' as in meta/train.json
    assert len(keys) == 303 and splits.tfds_slice(303, 90) == 273
    assert sorted(rel(p) for p, _ in src.files["train"]) == sorted(ranked[:273])
    assert sorted(rel(p) for p, _ in src.files["val"]) == sorted(ranked[273:])
    assert sorted(rel(p) for p, _ in src.files["test"]) == sorted(f"{c}/9" for c in src.classes)  # TFDS validation


def test_food101_with_other_classes_is_one_clear_line(tmp_path):
    _food_tree(tmp_path, ["apple_pie", "sushi"])
    with pytest.raises(DataError, match=r"does not hold food101.*classes differ from Food-101's 101"):
        sources.named_source("food101", str(tmp_path), False)


def test_imagenet_train_98_and_minival_99_percent_in_tfds_order(tmp_path):
    names = {c: [f"{c}_{i}.JPEG" for i in range(100)] for c in ("n01440764", "n01443537")}
    for split, count in (("train", 100), ("val", 3)):
        for c, files in names.items():
            (tmp_path / split / c).mkdir(parents=True)
            for f in files[:count]:
                (tmp_path / split / c / f).write_bytes(b"jpeg")
    src = sources.named_source("imagenet", str(tmp_path), False)
    ranked = _tfds_rank([f for v in names.values() for f in v])  # TFDS key: the file name
    assert sorted(Path(p).name for p, _ in src.files["train"]) == sorted(ranked[:196])  # train[:98%]
    assert sorted(Path(p).name for p, _ in src.files["val"]) == sorted(ranked[198:])  # train[99%:]
    assert len(src.files["test"]) == 6 and all("/val/" in p for p, _ in src.files["test"])  # validation = test
    assert "train[99%:]" in src.description


def test_flowers102_uses_setid_as_tfds_does(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    base.mkdir()
    savemat(base / "imagelabels.mat", {"labels": np.repeat(np.arange(1, 103), 3)})
    ids = np.arange(1, 307).reshape(102, 3)
    savemat(base / "setid.mat", {"trnid": ids[:, 0], "valid": ids[:, 1], "tstid": ids[:, 2]})
    src = sources.named_source("flowers102", str(tmp_path), False)
    first = {s: Path(v[0][0]).name for s, v in src.files.items()}
    assert first == {"train": "image_00001.jpg", "val": "image_00002.jpg", "test": "image_00003.jpg"}
    assert [len(v) for v in src.files.values()] == [102, 102, 102]
