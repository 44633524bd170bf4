"""Raw image sources: the bundled demo, ImageFolder trees (local, gs://, or an archive of one) and the
paper datasets in torchvision's layouts; decoding files to RGB arrays (the whole image, aspect kept, long
side to `data.stored_resolution`, letterboxed at the top-left of the square canvas with its frame recorded);
quarantining what cannot be read.

A source may be a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive (local or gs://) holding the ImageFolder
tree; it is extracted after every member has been checked (no absolute paths, no `..`, no links leaving
the tree, no devices). Files that cannot be decoded are copied, bytes unchanged, into `quarantine/`
(their path below the source root) and listed with their reason in the manifest's `skipped`.
Images without labels (`data.labels=none`, `distill.images`): `unlabelled_source`, label NO_LABEL (-1).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from funmatch import storage
from funmatch.data import splits as tfds_splits
from funmatch.data.prepared import NO_LABEL, SPLITS
from funmatch.errors import DataError

# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".zip")
QUARANTINE_DIR = "quarantine"


class BadImage(ValueError):
    """An image file that cannot be used; `kind` is one of empty, not_an_image, truncated, corrupt,
    too_many_pixels (and, when the file cannot even be read, unreadable)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Source:
    """What a source yields before decoding: classes and, per split, (file, label) pairs."""

    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path or URI, label)]; a missing split is derived
    description: str
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # pre-decoded sources
    root: str = ""  # the directory or gs:// prefix the files lie below
    archive: str = ""  # the archive they were extracted from, if any

    def relative(self, path: str) -> str:
        """`path` below the source root (its base name when it lies elsewhere)."""
        if self.root and path.startswith(self.root.rstrip("/") + "/"):
            return path[len(self.root.rstrip("/")) + 1 :]
        return path.rsplit("/", 1)[-1]

    def display(self, path: str) -> str:
        """How reports name a file: its path or URI, or `<archive>!/<member>`."""
        return f"{self.archive}!/{self.relative(path)}" if self.archive else path


def demo_source() -> Source:
    """The bundled Fashion-MNIST subset (fixed train/val/test splits)."""
    path = resources.files("funmatch.data.demo_data") / "fashion_mnist_subset.npz"
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        arrays = {s: (z[f"{s}_images"], z[f"{s}_labels"].astype(np.int64)) for s in SPLITS}
        classes = [str(c) for c in z["classes"]]
    return Source(classes, {}, "demo: Fashion-MNIST subset (MIT), bundled", arrays)


def _walk_files(root: str) -> list[str]:
    """Files below `root`, following directory links once each (a link loop cannot recurse) and
    listing a file reached through several links once (by its real path, first in sorted order)."""
    out, seen, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            real_file = os.path.realpath(path)
            if real_file not in seen_files:
                seen_files.add(real_file)
                out.append(path)
    return out


def _class_tree(root: str, files: Iterable[str]) -> tuple[list[str], list[tuple[str, int]], set[str]]:
    """ImageFolder rule: the first path component below `root` is the class; images found recursively."""
    by_class: dict[str, list[str]] = {}
    for f in files:
        rel = f[len(root) :].lstrip("/")
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
    top = {f[len(root) :].lstrip("/").split("/", 1)[0] for f in all_files}
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
                raise DataError(
                    f"data.source={uri!r}: split {d!r} has classes {cls[:5]}..., "
                    f"train has {classes[:5]}... (every split needs the same class folders)"
                )
            _check_classes(uri, classes, empty)
            files[split] = pairs
        if classes is None:  # unreachable: split_dirs["train"] is a folder the loop above read
            raise DataError(f"data.source={uri!r}: no split folder was read")
    else:
        classes, pairs, empty = _class_tree(root, all_files)
        _check_classes(uri, classes, empty)
        files["all"] = pairs
    return Source(classes, files, f"folder: {uri}", root=root)


def _check_classes(uri: str, classes: list[str], empty: set[str]) -> None:
    if not classes:
        raise DataError(f"data.source={uri!r} has no class folders (expected <source>/<class>/<image>)")
    if empty:
        raise DataError(
            f"data.source={uri!r}: class folder(s) {sorted(empty)} hold no images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    if len(classes) < 2:
        raise DataError(f"data.source={uri!r} has a single class {classes[0]!r}: distillation needs at least 2")


def image_source(uri: str, workdir: str | Path | None = None, key: str = "data.source") -> Source:
    """A local directory, gs:// prefix or archive of images without labels (`data.labels=none`,
    `distill.images`): every image file below it, in any folders, as one pool `all` labelled NO_LABEL."""
    check_source(uri, key)
    root, archive = uri.rstrip("/"), ""
    if is_archive(uri):
        if workdir is None:
            raise DataError(f"{key}={uri!r} is an archive: image_source needs a workdir to extract it into")
        root, archive = extract_archive(uri, workdir), uri
    files = list(storage.list_files(root)) if storage.is_gcs(root) else _walk_files(root)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise DataError(f"{key}={uri!r} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    description = f"{'archive' if archive else 'images'}: {uri}, no labels"
    return Source([], {"all": [(f, NO_LABEL) for f in images]}, description, root=root, archive=archive)


def unlabelled_source(
    uri: str, root: str = "", download: bool = False, workdir: str | Path | None = None, key: str = "data.source"
) -> Source:
    """The images of `uri` with their labels dropped, as one pool `all` labelled NO_LABEL: the train images of
    the demo or a named dataset (SUN397: its one pool), else every image below a directory, gs:// prefix or
    archive (`image_source`)."""
    if uri != "demo" and uri not in NAMED_READERS and uri != "imagenet":
        return image_source(uri, workdir, key)
    src = open_source(uri, root, download, workdir)
    description = f"{src.description}; train images, labels dropped"
    if src.arrays:
        images = src.arrays["train"][0]
        return Source([], {}, description, {"all": (images, np.full(len(images), NO_LABEL, np.int64))})
    pairs = src.files.get("train") or src.files["all"]
    return Source([], {"all": [(f, NO_LABEL) for f, _ in pairs]}, description, root=src.root, archive=src.archive)


def _flowers102(base: Path) -> Source:
    from scipy.io import loadmat

    base = base / "flowers-102"
    labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
    ids = loadmat(base / "setid.mat", squeeze_me=True)
    files = {
        split: [(str(base / "jpg" / f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids[key]]
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }
    return Source(
        [f"flower_{c:03d}" for c in range(1, 103)],
        files,
        "flowers102: TFDS train / validation / test (setid trnid / valid / tstid)",
    )


def _tfds_cut(
    pairs: list[tuple[str, int]], keys: list[str], train_pct: float, val_from_pct: float
) -> dict[str, list[tuple[str, int]]]:
    """TFDS's `train[:train_pct%]` and `train[val_from_pct%:]` of a train split whose examples have TFDS
    keys `keys`: positions in TFDS's stored order (funmatch.data.splits.tfds_order), each part kept in
    the source's own order. Examples between the two cuts (ImageNet's train[98%:99%]) are in neither."""
    order = tfds_splits.tfds_order(keys, "train")
    n = len(order)
    take = {
        "train": sorted(order[: tfds_splits.tfds_slice(n, train_pct)]),
        "val": sorted(order[tfds_splits.tfds_slice(n, val_from_pct) :]),
    }
    return {split: [pairs[i] for i in idx] for split, idx in take.items()}


def _pets(base: Path) -> Source:
    base = base / "oxford-iiit-pet"
    files, names = {}, {}
    for split, name in (("train", "trainval"), ("test", "test")):
        rows = [line.split()[:2] for line in (base / "annotations" / f"{name}.txt").read_text().splitlines() if line]
        files[split] = [(str(base / "images" / f"{image_id}.jpg"), int(label) - 1) for image_id, label in rows]
        names.update({int(label) - 1: image_id.rsplit("_", 1)[0] for image_id, label in rows})
    # TFDS oxford_iiit_pet: split 'train' = trainval.txt, example key '<image id>.jpg'
    files |= _tfds_cut(files["train"], [posixpath.basename(f) for f, _ in files["train"]], 90, 90)
    return Source(
        [names[i] for i in sorted(names)], files, "pets: TFDS train[:90%] / train[90%:] (trainval.txt) / test"
    )


def _food101(base: Path) -> Source:
    base = base / "food-101"
    meta = {
        split: json.loads((base / "meta" / f"{name}.json").read_text())
        for split, name in (("train", "train"), ("test", "test"))
    }
    classes = tfds_splits.food101_labels()  # TFDS's label order, which the released teacher's head uses
    for split, m in meta.items():
        if set(m) != set(classes):
            raise ValueError(
                f"meta/{split}.json's classes differ from Food-101's 101 (e.g. {sorted(set(m) ^ set(classes))[:3]})"
            )
    files = {
        split: [(str(base / "images" / f"{rel}.jpg"), i) for i, c in enumerate(classes) for rel in m[c]]
        for split, m in meta.items()
    }
    # TFDS food101: split 'train' = meta/train.json, 'validation' = meta/test.json, key = '<class>/<id>'
    keys = [rel for c in classes for rel in meta["train"][c]]
    files |= _tfds_cut(files["train"], keys, 90, 90)
    return Source(classes, files, "food101: TFDS train[:90%] / train[90%:] / validation (meta/test.json) as test")


def _sun397(base: Path) -> Source:
    """TFDS `sun397` (config `tfds`, big_vision's `sun397`): its shipped train / validation / test file
    lists, label = the file's folder in TFDS's class order. A listed file missing from the copy stays
    in its split and is reported by decode like an unreadable one (skipped, counted against
    data.max_bad_fraction); the description names how many and the first few."""
    base = base / "SUN397"
    labels = tfds_splits.sun397_labels()
    index = {c: i for i, c in enumerate(labels)}
    lists = tfds_splits.sun397_lists()
    listed = [f for fs in lists.values() for f in fs]
    present = {"/" + p.relative_to(base).as_posix() for p in base.rglob("sun_*.jpg")}
    missing = [f for f in listed if f not in present]
    if len(missing) == len(listed):
        raise FileNotFoundError(f"none of TFDS's {len(listed)} SUN397 images is below {base} (e.g. {base}{listed[0]})")
    files = {split: [(f"{base}{f}", index[f.rsplit("/", 1)[0]]) for f in fs] for split, fs in lists.items()}
    description = "sun397: TFDS sun397/tfds file lists train / validation / test"
    if missing:
        description += f"; {len(missing)} listed file(s) missing (skipped as unreadable): {', '.join(missing[:3])}"
    return Source([c.rsplit("/", 1)[-1] if c.count("/") == 2 else c.strip("/") for c in labels], files, description)


NAMED_READERS = {"flowers102": _flowers102, "pets": _pets, "food101": _food101, "sun397": _sun397}


TORCHVISION_CLASSES = {"flowers102": "Flowers102", "pets": "OxfordIIITPet", "food101": "Food101", "sun397": "SUN397"}


def named_source(name: str, root: str, download: bool) -> Source:
    """The paper's datasets: torchvision's on-disk layouts under `root` (ImageNet: ImageFolder `train/` +
    `val/`, the latter being the paper's test split), split as big_vision's configs/proj/distill/*.py
    split them in TFDS: the same files, and percent slices (`train[:90%]`, ...) taken in TFDS's stored
    order (funmatch.data.splits), so train/val/test are all given and prepare cuts nothing."""
    if name == "imagenet":
        src = folder_source(root)
        if "val" in src.files and "test" not in src.files:
            src.files["test"] = src.files.pop("val")  # ImageNet's official validation is the paper's test
        src.description = "imagenet: train / val / test folders as given"
        if "val" not in src.files:  # bit_i1k.py: train 'train[:98%]', minival 'train[99%:]'; TFDS key: file name
            src.files |= _tfds_cut(src.files["train"], [posixpath.basename(f) for f, _ in src.files["train"]], 98, 99)
            src.description = "imagenet: TFDS train[:98%] / train[99%:] (bit_i1k minival) / validation (= test)"
        return src
    if storage.is_gcs(root):
        raise DataError(
            f"data.root={root!r}: {name} is read from a mounted directory (a PVC or GCS FUSE path); "
            "gs:// prefixes are supported for ImageFolder sources"
        )
    if download:
        import torchvision.datasets as tvd

        getattr(tvd, TORCHVISION_CLASSES[name])(root, download=True)
    try:
        return NAMED_READERS[name](Path(root))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"data.root={root!r} does not hold {name} in torchvision's layout ({e}); "
            "point data.root at a copy, or set data.download=true on a machine with network"
        ) from e


def open_source(uri: str, root: str = "", download: bool = False, workdir: str | Path | None = None) -> Source:
    """The source named by `uri`; an archive is extracted into `workdir` (required for archives)."""
    if uri == "demo":
        return demo_source()
    if is_archive(uri):
        if workdir is None:
            raise DataError(f"data.source={uri!r} is an archive: open_source needs a workdir to extract it into")
        check_source(uri)
        source = folder_source(extract_archive(uri, workdir))
        source.archive, source.description = uri, f"archive: {uri}"
        return source
    if uri in NAMED_READERS or uri == "imagenet":
        return named_source(uri, root, download)
    return folder_source(uri)


def check_data(source: str, root: str, download: bool, key: str = "data.source") -> None:
    """Fails fast (before any compute) when the configured data (`key`: its config key) cannot be read."""
    if source in NAMED_READERS or source == "imagenet":
        if not root:
            raise DataError(
                f"{key}={source!r} needs data.root: the directory (or, for imagenet, gs:// prefix) holding it"
            )
        if not download:
            check_source(root)
        return
    check_source(source, key)


def check_source(uri: str, key: str = "data.source") -> None:
    """Fails fast (before any compute) when `uri` (the value of config key `key`) cannot be a source."""
    if uri == "demo":
        return
    if storage.is_gcs(uri):
        storage.split_gcs(uri)
        return
    if is_archive(uri):
        if not os.path.isfile(uri):
            raise DataError(
                f"{key}={uri!r} does not exist or is not a file (an archive source is a "
                f"local or gs:// {'/'.join(ARCHIVE_EXTENSIONS)} file)"
            )
        if not os.access(uri, os.R_OK):
            raise DataError(f"{key}={uri!r} is not readable")
        return
    if not os.path.isdir(uri):
        raise DataError(
            f"{key}={uri!r} does not exist or is not a directory "
            "(expected 'demo', a directory in ImageFolder layout or a gs:// prefix)"
        )
    if not os.access(uri, os.R_OK | os.X_OK):
        raise DataError(f"{key}={uri!r} is not readable")


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_EXTENSIONS)


def _unsafe(name: str) -> str | None:
    """Why an archive path (member name or link target) may not be extracted, or None."""
    if not name or "\x00" in name:
        return "has an empty name or one holding NUL"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "contains '..'"
    return None


def _check_tar_member(uri: str, m: tarfile.TarInfo) -> None:
    why = _unsafe(m.name)
    if why is None and (m.issym() or m.islnk()):
        # a symlink resolves next to the member, a hard link from the archive root
        target = posixpath.join(posixpath.dirname(m.name), m.linkname) if m.issym() else m.linkname
        if m.linkname.startswith("/") or posixpath.normpath(target).split("/")[0] == "..":
            why = f"is a link to {m.linkname!r}, outside the extracted tree"
    elif why is None and not (m.isfile() or m.isdir()):
        why = "is a device, fifo or other special file"
    if why:
        raise DataError(f"data.source={uri!r}: archive member {m.name!r} {why}; refusing to extract the archive")


def extract_archive(uri: str, workdir: str | Path) -> str:
    """Checks every member of a local or gs:// tar/tar.gz/zip archive, extracts it into
    `workdir`/tree and returns the ImageFolder root (the single top folder when there is one)."""
    work = Path(workdir)
    local = storage.fetch(uri, work / "download")
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    try:
        if uri.lower().endswith(".zip"):
            with zipfile.ZipFile(local) as z:
                for info in z.infolist():
                    why = _unsafe(info.filename)
                    if why:
                        raise DataError(
                            f"data.source={uri!r}: archive member {info.filename!r} {why}; "
                            "refusing to extract the archive"
                        )
                z.extractall(tree)
        else:
            with tarfile.open(local) as t:
                members = t.getmembers()
                for m in members:
                    _check_tar_member(uri, m)
                if hasattr(tarfile, "data_filter"):  # 3.11.4+: the standard library checks again
                    t.extractall(tree, members, filter="data")
                else:
                    t.extractall(tree, members)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"data.source={uri!r} is not a readable archive ({type(e).__name__}: {e})") from e
    entries = list(tree.iterdir())
    split_names = {n for names in SPLIT_DIR_NAMES.values() for n in names}
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in split_names:
        return str(entries[0])  # `tar czf data.tgz flowers/` wraps the tree in one folder
    return str(tree)


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes → h×w×3 uint8 RGB, the whole image with its aspect ratio: EXIF orientation applied, any
    mode converted, resized (antialiased) so that its long side is `size` (`fit_long_side`; `letterbox`
    places it on the stored canvas). Raises ValueError for anything unreadable or too large."""
    if not data:
        raise BadImage("empty", "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > max_pixels:
                    raise BadImage(
                        "too_many_pixels",
                        f"refused: {opened.width}x{opened.height} is more pixels than "
                        f"data.max_image_pixels={max_pixels}",
                    )
                opened.load()
                img = to_rgb(ImageOps.exif_transpose(opened))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(
                "too_many_pixels", f"refused: more pixels than data.max_image_pixels={max_pixels} ({e})"
            ) from e
        except UnidentifiedImageError as e:
            raise BadImage("not_an_image", f"{type(e).__name__}: {e}") from e
        except (OSError, SyntaxError) as e:
            kind = "truncated" if "truncated" in str(e) else "corrupt"
            raise BadImage(kind, f"{type(e).__name__}: {e}") from e
    return np.asarray(fit_long_side(img, size), dtype=np.uint8)


def fit_long_side(img: Image.Image, size: int) -> Image.Image:
    """`img` resized (bilinear, antialiased) so that its long side is `size` and its short side
    round(short·size/long) (at least 1): the whole frame, aspect kept. An image whose long side is at most
    `size` is kept as it is (the views resize it anyway: storing it upscaled would only add bytes, e.g. an
    ImageNet photo on a 592 px canvas); a larger square one comes out exactly as the former short-side fit."""
    w, h = img.size
    long = max(w, h)
    if long <= size:
        return img
    new = (max(1, round(w * size / long)), max(1, round(h * size / long)))
    return img if new == img.size else img.resize(new, Image.Resampling.BILINEAR)


def letterbox(images: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """h×w×3 uint8 images (each side at most `size`) → (N×S×S×3 canvases with each image at the top-left
    and zeros elsewhere, N×2 int32 frames (h, w): the valid region of each canvas)."""
    canvas = np.zeros((len(images), size, size, 3), np.uint8)
    frames = np.zeros((len(images), 2), np.int32)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        canvas[i, :h, :w], frames[i] = im, (h, w)
    return canvas, frames


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


def resize_array(images: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """N×H×W(×C) uint8 → (N×S×S×3 canvases, N×2 int32 frames) through the same fit as decoded files."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images), np.full((len(images), 2), size, np.int32)
    return letterbox([np.asarray(fit_long_side(Image.fromarray(im), size)) for im in images], size)


def decode_files(
    pairs: list[tuple[str, int]],
    size: int,
    max_pixels: int,
    progress: Callable[[int], object] | None = None,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Decodes files in parallel threads (0: 64 for gs:// objects, whose reads mostly wait on the
    network, else 2 per CPU); returns (images N×S×S×3 letterboxed, frames N×2, labels,
    skipped[{path, kind, reason}]) in input order."""
    if not workers:
        workers = 64 if pairs and storage.is_gcs(pairs[0][0]) else 2 * (os.cpu_count() or 4)

    def one(item: tuple[str, int]):
        path, label = item
        try:
            blob = storage.read_bytes(path)
        except OSError as e:
            return None, label, {"path": path, "kind": "unreadable", "reason": f"{type(e).__name__}: {e}"[:300]}
        try:
            return decode_image(blob, size, max_pixels), label, None
        except ValueError as e:
            return None, label, {"path": path, "kind": getattr(e, "kind", "corrupt"), "reason": str(e)[:300]}

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
    canvas, frames = letterbox(images, size)
    return canvas, frames, np.asarray(labels, dtype=np.int64), skipped


def quarantine(source: Source, skipped: list[dict], out_dir: str | Path) -> None:
    """Copies every skipped file's bytes into `out_dir`/quarantine/<its path below the source root>
    and records that place (or why there is no copy) in its entry; entries get their display name."""
    qdir = Path(out_dir) / QUARANTINE_DIR
    for entry in skipped:
        path = entry["path"]
        # '.', '..' and empty parts dropped: a gs:// object name may hold them, the copy stays inside
        parts = [p for p in source.relative(path).replace("\\", "/").split("/") if p not in ("", ".", "..")]
        rel = "/".join(parts) or "unnamed"
        target, n = qdir / rel, 1
        while target.exists():
            target, n = qdir / f"{rel}~{n}", n + 1
        try:
            blob = storage.read_bytes(path)
        except OSError as e:
            entry["quarantine"] = None
            entry["copy_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
            entry["quarantine"] = target.relative_to(out_dir).as_posix()
            entry["bytes"] = len(blob)
            entry["sha256"] = hashlib.sha256(blob).hexdigest()
        entry["path"] = source.display(path)
