"""The paper's splits as big_vision reads them from TFDS: shipped file lists and TFDS's slicing.

- `sun397_tfds_{train,validation,test}.txt.gz`: TFDS `sun397` (config `tfds`, the one big_vision's
  `sun397` loads) file lists, 76,128 / 10,875 / 21,750 paths such as `/a/abbey/sun_aaaulhwrhqgejnyt.jpg`
  below the `SUN397/` folder; `sun397_labels.txt`: TFDS's class order. `food101_labels.txt`: TFDS's
  `food101` class order (not alphabetical: `cheesecake` comes before `cheese_plate`), which the released
  teacher's head follows. Where they come from, with checksums: `PROVENANCE`.
- `tfds_order` / `tfds_slice`: a TFDS split is stored sorted by md5(split name + example key), so
  `train[:90%]` is the first round(0.9 n) examples in that order. Reproducing the order from the keys
  TFDS's builders use (Pets: `Abyssinian_1.jpg`, Food101: `apple_pie/1005649`, ImageNet:
  `n01440764_10026.JPEG`) gives the same membership as big_vision's percent slices, with no TFDS installed.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from importlib import resources

SUN397_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> TFDS's file name


def _text(name: str) -> str:
    data = (resources.files(__name__) / name).read_bytes()
    return (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")


def _lines(name: str) -> list[str]:
    return [line.strip() for line in _text(name).splitlines() if line.strip()]


def sun397_lists() -> dict[str, list[str]]:
    """Our split name -> the TFDS file list (paths below `SUN397/`, e.g. `/a/abbey/sun_x.jpg`)."""
    return {ours: _lines(f"sun397_tfds_{tfds}.txt.gz") for ours, tfds in SUN397_SPLITS.items()}


def sun397_labels() -> list[str]:
    """TFDS's SUN397 classes in label order (`/a/abbey`, ..., `/c/car_interior/backseat`, ...)."""
    return _lines("sun397_labels.txt")


def food101_labels() -> list[str]:
    """TFDS's Food101 classes in label order."""
    return _lines("food101_labels.txt")


def tfds_order(keys: Sequence[str], split: str) -> list[int]:
    """Indices of `keys` in the order TFDS stores split `split`: ascending md5(split + key), the hash of
    tensorflow_datasets.core.hashing.Hasher with the split name as salt (core/split_builder.py)."""
    salted = hashlib.md5(split.encode("utf-8"))

    def hkey(key: str) -> int:
        md5 = salted.copy()
        md5.update(key.replace("\\", "/").encode("utf-8"))
        return int(md5.hexdigest(), 16)

    hashes = [hkey(k) for k in keys]
    return sorted(range(len(keys)), key=hashes.__getitem__)


def tfds_slice(n: int, percent: float) -> int:
    """The index TFDS's `split[:percent%]` boundary lands on in a split of `n` examples (its default
    'closest' rounding: int(round(percent * n / 100)), Python's round, ties to even)."""
    return int(round(percent * n / 100.0))
