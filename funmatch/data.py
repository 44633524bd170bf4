"""Image sources, decoding, deterministic splits and the prepared dataset artifact.

The artifact is a directory: `manifest.json` (classes, split sizes, source, stored resolution, shard
checksums, skipped files) and per split `.npy` shards of uint8 images (N×S×S×3, RGB) and int64
labels. `.npy` loads without pickle and memory-maps, so a trainer can stream shards or hold a small
dataset resident on the GPU.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from funmatch import storage
from funmatch.errors import DataError

FORMAT = "funmatch-dataset/1"
SPLITS = ("train", "val", "test")
# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


@dataclass
class Source:
    """What a source yields before decoding: classes and, per split, (file, label) pairs."""

    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path or URI, label)]; a missing split is derived
    description: str
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # pre-decoded sources


# ---------------------------------------------------------------- sources

def demo_source() -> Source:
    """The bundled Fashion-MNIST subset (fixed train/val/test splits)."""
    path = resources.files("funmatch.demo_data") / "fashion_mnist_subset.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        arrays = {s: (z[f"{s}_images"], z[f"{s}_labels"].astype(np.int64)) for s in SPLITS}
        classes = [str(c) for c in z["classes"]]
    return Source(classes, {}, "demo: Fashion-MNIST subset (MIT), bundled", arrays)


def _walk_files(root: str) -> list[str]:
    """Files below `root`, following directory links once each (a link loop cannot recurse)."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return out


def _class_tree(root: str, files: Iterable[str]) -> tuple[list[str], list[tuple[str, int]], set[str]]:
    """ImageFolder rule: the first path component below `root` is the class; images found recursively."""
    by_class: dict[str, list[str]] = {}
    for f in files:
        rel = f[len(root):].lstrip("/")
        if "/" not in rel:
            continue  # files at the top level belong to no class
        cls = rel.split("/", 1)[0]
        by_class.setdefault(cls, [])
        if f.lower().endswith(IMAGE_EXTENSIONS):
            by_class[cls].append(f)
    classes = sorted(by_class)
    empty = {c for c in classes if not by_class[c]}
    pairs = [(f, i) for i, c in enumerate(classes) for f in by_class[c]]
    return classes, pairs, empty


def folder_source(uri: str) -> Source:
    """A local directory or gs:// prefix in ImageFolder layout, optionally split into train/val/test."""
    check_source(uri)
    root = uri.rstrip("/")
    all_files = list(storage.list_files(root)) if storage.is_gcs(root) else _walk_files(root)
    if not all_files:
        raise DataError(f"data.source={uri!r} holds no files (expected one folder of images per class)")
    top = {f[len(root):].lstrip("/").split("/", 1)[0] for f in all_files}
    split_dirs = {s: next((d for d in names if d in top), None) for s, names in SPLIT_DIR_NAMES.items()}
    files: dict[str, list[tuple[str, int]]] = {}
    if split_dirs["train"]:
        classes = None
        for split, d in split_dirs.items():
            if d is None:
                continue
            sub = f"{root}/{d}"
            cls, pairs, empty = _class_tree(sub, [f for f in all_files if f.startswith(sub + "/")])
            if classes is None:
                classes = cls
            elif cls != classes:
                raise DataError(f"data.source={uri!r}: split {d!r} has classes {cls[:5]}..., "
                                f"train has {classes[:5]}... (every split needs the same class folders)")
            _check_classes(uri, classes, empty)
            files[split] = pairs
    else:
        classes, pairs, empty = _class_tree(root, all_files)
        _check_classes(uri, classes, empty)
        files["all"] = pairs
    return Source(classes, files, f"folder: {uri}")


def _check_classes(uri: str, classes: list[str], empty: set[str]) -> None:
    if not classes:
        raise DataError(f"data.source={uri!r} has no class folders (expected <source>/<class>/<image>)")
    if empty:
        raise DataError(f"data.source={uri!r}: class folder(s) {sorted(empty)} hold no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"data.source={uri!r} has a single class {classes[0]!r}: distillation needs at least 2")


def open_source(uri: str) -> Source:
    return demo_source() if uri == "demo" else folder_source(uri)


def check_source(uri: str) -> None:
    """Fails fast (before any compute) when `uri` cannot be a source."""
    if uri == "demo":
        return
    if storage.is_gcs(uri):
        storage.split_gcs(uri)
        return
    if not os.path.isdir(uri):
        raise DataError(f"data.source={uri!r} does not exist or is not a directory "
                        "(expected 'demo', a directory in ImageFolder layout or a gs:// prefix)")
    if not os.access(uri, os.R_OK | os.X_OK):
        raise DataError(f"data.source={uri!r} is not readable")


# ---------------------------------------------------------------- decoding

def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes → S×S×3 uint8 RGB: EXIF orientation applied, any mode converted, short side resized to
    `size` (antialiased), centre-cropped. Raises ValueError for anything unreadable or too large."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise ValueError(f"refused: {img.width}x{img.height} is more pixels than "
                                     f"data.max_image_pixels={max_pixels}")
                img.load()
                img = ImageOps.exif_transpose(img)
                img = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refused: more pixels than data.max_image_pixels={max_pixels} ({e})") from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{type(e).__name__}: {e}") from e
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, palette (with transparency), RGBA, LA and CMYK → RGB (alpha over white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """N×H×W(×C) uint8 → N×S×S×3 through the same fit as decoded files."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    return np.stack([np.asarray(ImageOps.fit(Image.fromarray(im), (size, size), Image.Resampling.BILINEAR))
                     for im in images])


# ---------------------------------------------------------------- splits

def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded per-class split of indices into len(fractions)+1 parts (the rest goes last)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            parts[i].append(idx[start:start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


# ---------------------------------------------------------------- the artifact

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray,
                shard_size: int, num_classes: int) -> dict:
    shards = []
    for i, start in enumerate(range(0, len(images), shard_size)):
        entry = {"count": int(min(shard_size, len(images) - start))}
        for kind, arr in (("images", images[start:start + shard_size]), ("labels", labels[start:start + shard_size])):
            name = f"{split}-{i:05d}-{kind}.npy"
            np.save(out_dir / name, np.ascontiguousarray(arr), allow_pickle=False)
            entry[kind] = name
            entry[f"{kind}_sha256"] = sha256_file(out_dir / name)
        shards.append(entry)
    counts = np.bincount(labels, minlength=num_classes)
    return {"count": int(len(images)), "class_counts": counts.tolist(), "shards": shards}


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{dataset_dir} is not a prepared dataset ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_split(dataset_dir: str | Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images N×S×S×3 uint8, labels N int64) of one split; shard checksums verified."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_dir} has no split {split!r} (has {', '.join(manifest['splits'])})")
    images, labels = [], []
    for shard in manifest["splits"][split]["shards"]:
        for kind, out in (("images", images), ("labels", labels)):
            path = dataset_dir / shard[kind]
            if verify and sha256_file(path) != shard[f"{kind}_sha256"]:
                raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
            out.append(np.load(path, allow_pickle=False))
    return np.concatenate(images), np.concatenate(labels)


def decode_files(pairs: list[tuple[str, int]], size: int, max_pixels: int,
                 progress: Callable[[int], None] | None = None, workers: int = 8
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decodes files in parallel; returns (images, labels, skipped[{path, reason}]) in input order."""
    def one(item: tuple[str, int]):
        path, label = item
        try:
            return decode_image(storage.read_bytes(path), size, max_pixels), label, None
        except (ValueError, OSError) as e:
            return None, label, {"path": path, "reason": str(e)[:300]}

    images, labels, skipped = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for img, label, bad in pool.map(one, pairs):
            if progress:
                progress(1)
            if bad:
                skipped.append(bad)
            else:
                images.append(img)
                labels.append(label)
    shape = (0, size, size, 3)
    return (np.stack(images) if images else np.zeros(shape, np.uint8),
            np.asarray(labels, dtype=np.int64), skipped)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of batch `step` in an endless stream of seeded per-epoch permutations of range(n).

    Batch s covers stream positions [s·B, (s+1)·B), so the data order is a pure function of the
    step: a resumed run sees exactly the batches the uninterrupted run would have seen.
    """
    start = step * batch_size
    parts, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, start + batch_size - pos)
        parts.append(_epoch_permutation(epoch, n, seed)[offset:offset + take])
        pos += take
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(epoch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
