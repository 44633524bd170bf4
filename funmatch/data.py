"""Image sources, decoding, deterministic splits and the prepared dataset artifact.

The artifact is a directory: `manifest.json` (classes, split sizes, source, stored resolution, encoding,
shard checksums, skipped files) and per split shards of images and int64 labels. Images are stored
`raw` (`.npy` uint8 N×S×S×3, RGB: small datasets, loaded whole onto the GPU) or `jpeg` (the images
JPEG-encoded back to back plus byte offsets: ImageNet-size datasets, streamed and decoded in parallel
by the trainer's loader). `.npy` loads without pickle and memory-maps. Files that cannot be decoded
are copied, bytes unchanged, into `quarantine/` (their path below the source root) and listed with
their reason in `skipped`.

A source may also be a `.tar`, `.tar.gz`/`.tgz` or `.zip` archive (local or gs://) holding the
ImageFolder tree; it is extracted after every member has been checked (no absolute paths, no `..`,
no links leaving the tree, no devices).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import warnings
import zipfile
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
ENCODINGS = ("raw", "jpeg")  # how the artifact stores images: uint8 arrays, or JPEG bytes
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
            return path[len(self.root.rstrip("/")) + 1:]
        return path.rsplit("/", 1)[-1]

    def display(self, path: str) -> str:
        """How reports name a file: its path or URI, or `<archive>!/<member>`."""
        return f"{self.archive}!/{self.relative(path)}" if self.archive else path


# ---------------------------------------------------------------- sources

def demo_source() -> Source:
    """The bundled Fashion-MNIST subset (fixed train/val/test splits)."""
    path = resources.files("funmatch.demo_data") / "fashion_mnist_subset.npz"
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
    return Source(classes, files, f"folder: {uri}", root=root)


def _check_classes(uri: str, classes: list[str], empty: set[str]) -> None:
    if not classes:
        raise DataError(f"data.source={uri!r} has no class folders (expected <source>/<class>/<image>)")
    if empty:
        raise DataError(f"data.source={uri!r}: class folder(s) {sorted(empty)} hold no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"data.source={uri!r} has a single class {classes[0]!r}: distillation needs at least 2")


# ---------------------------------------------------------------- the paper's datasets

def _flowers102(base: Path) -> Source:
    from scipy.io import loadmat

    base = base / "flowers-102"
    labels = loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"]
    ids = loadmat(base / "setid.mat", squeeze_me=True)
    files = {split: [(str(base / "jpg" / f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1)
                     for i in ids[key]] for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    return Source([f"flower_{c:03d}" for c in range(1, 103)], files, "flowers102: train / validation / test")


def _pets(base: Path) -> Source:
    base = base / "oxford-iiit-pet"
    files, names = {}, {}
    for split, name in (("train", "trainval"), ("test", "test")):
        rows = [line.split()[:2] for line in (base / "annotations" / f"{name}.txt").read_text().splitlines() if line]
        files[split] = [(str(base / "images" / f"{image_id}.jpg"), int(label) - 1) for image_id, label in rows]
        names.update({int(label) - 1: image_id.rsplit("_", 1)[0] for image_id, label in rows})
    return Source([names[i] for i in sorted(names)], files, "pets: trainval (→ train[:90%] / train[90%:]) / test")


def _food101(base: Path) -> Source:
    base = base / "food-101"
    meta = {split: json.loads((base / "meta" / f"{name}.json").read_text())
            for split, name in (("train", "train"), ("test", "test"))}
    classes = sorted(meta["train"])
    files = {split: [(str(base / "images" / f"{rel}.jpg"), classes.index(c)) for c in classes for rel in m[c]]
             for split, m in meta.items()}
    return Source(classes, files, "food101: train (→ train[:90%] / train[90%:]) / test (TFDS validation)")


def _sun397(base: Path) -> Source:
    base = base / "SUN397"
    classes = [line.strip() for line in (base / "ClassName.txt").read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    pairs = sorted((str(p), index["/" + "/".join(p.relative_to(base).parts[:-1])]) for p in base.rglob("sun_*.jpg"))
    return Source([c.rsplit("/", 1)[-1] if c.count("/") == 2 else c.strip("/") for c in classes], {"all": pairs},
                  "sun397: one pool, split seeded and stratified")


NAMED_READERS = {"flowers102": _flowers102, "pets": _pets, "food101": _food101, "sun397": _sun397}
TORCHVISION_CLASSES = {"flowers102": "Flowers102", "pets": "OxfordIIITPet", "food101": "Food101", "sun397": "SUN397"}


def named_source(name: str, root: str, download: bool) -> Source:
    """The paper's datasets: torchvision's on-disk layouts under `root` (ImageNet: ImageFolder `train/` +
    `val/`, the latter being the paper's test split). Splits the source lacks (train[90%:], train[98%:],
    SUN397's partitions) are cut by prepare with a seeded stratified split."""
    if name == "imagenet":
        src = folder_source(root)
        if "val" in src.files and "test" not in src.files:
            src.files["test"] = src.files.pop("val")  # ImageNet's official validation is the paper's test
        src.description = "imagenet: train (→ train[:98%] / train[98%:]) / validation (= test)"
        return src
    if storage.is_gcs(root):
        raise DataError(f"data.root={root!r}: {name} is read from a mounted directory (a PVC or GCS FUSE path); "
                        "gs:// prefixes are supported for ImageFolder sources")
    if download:
        import torchvision.datasets as tvd

        getattr(tvd, TORCHVISION_CLASSES[name])(root, download=True)
    try:
        return NAMED_READERS[name](Path(root))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"data.root={root!r} does not hold {name} in torchvision's layout ({e}); "
                        "point data.root at a copy, or set data.download=true on a machine with network") from e


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


def check_data(source: str, root: str, download: bool) -> None:
    """Fails fast (before any compute) when the configured data cannot be read."""
    if source in NAMED_READERS or source == "imagenet":
        if not root:
            raise DataError(f"data.source={source!r} needs data.root: the directory (or, for imagenet, "
                            "gs:// prefix) holding it")
        if not download:
            check_source(root)
        return
    check_source(source)


def check_source(uri: str) -> None:
    """Fails fast (before any compute) when `uri` cannot be a source."""
    if uri == "demo":
        return
    if storage.is_gcs(uri):
        storage.split_gcs(uri)
        return
    if is_archive(uri):
        if not os.path.isfile(uri):
            raise DataError(f"data.source={uri!r} does not exist or is not a file (an archive source is a "
                            f"local or gs:// {'/'.join(ARCHIVE_EXTENSIONS)} file)")
        if not os.access(uri, os.R_OK):
            raise DataError(f"data.source={uri!r} is not readable")
        return
    if not os.path.isdir(uri):
        raise DataError(f"data.source={uri!r} does not exist or is not a directory "
                        "(expected 'demo', a directory in ImageFolder layout or a gs:// prefix)")
    if not os.access(uri, os.R_OK | os.X_OK):
        raise DataError(f"data.source={uri!r} is not readable")


# ---------------------------------------------------------------- archives

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
                        raise DataError(f"data.source={uri!r}: archive member {info.filename!r} {why}; "
                                        "refusing to extract the archive")
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


# ---------------------------------------------------------------- decoding

def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes → S×S×3 uint8 RGB: EXIF orientation applied, any mode converted, short side resized to
    `size` (antialiased), centre-cropped. Raises ValueError for anything unreadable or too large."""
    if not data:
        raise BadImage("empty", "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise BadImage("too_many_pixels", f"refused: {img.width}x{img.height} is more pixels than "
                                                      f"data.max_image_pixels={max_pixels}")
                img.load()
                img = ImageOps.exif_transpose(img)
                img = to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("too_many_pixels",
                           f"refused: more pixels than data.max_image_pixels={max_pixels} ({e})") from e
        except UnidentifiedImageError as e:
            raise BadImage("not_an_image", f"{type(e).__name__}: {e}") from e
        except (OSError, SyntaxError) as e:
            kind = "truncated" if "truncated" in str(e) else "corrupt"
            raise BadImage(kind, f"{type(e).__name__}: {e}") from e
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


class SplitWriter:
    """Writes one split's shards as images arrive, `shard_size` at a time (memory stays bounded by
    one shard). `raw`: `.npy` uint8 N×S×S×3; `jpeg`: the images JPEG-encoded back to back in a
    `.jpegs` file with an `.npy` of N+1 byte offsets (3–7× smaller: ImageNet streams from shards)."""

    def __init__(self, out_dir: str | Path, split: str, shard_size: int, num_classes: int,
                 encoding: str = "raw", jpeg_quality: int = 95) -> None:
        if encoding not in ENCODINGS:
            raise DataError(f"data.encoding={encoding!r} is not allowed; expected one of {ENCODINGS}")
        self.out, self.split, self.shard_size, self.encoding, self.quality = Path(out_dir), split, shard_size, encoding, jpeg_quality
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.shards: list[dict] = []
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        self._images.append(images)
        self._labels.append(np.asarray(labels, dtype=np.int64))
        self._pending += len(images)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> dict:
        """Writes the last partial shard; returns the split's manifest entry."""
        if self._pending:
            self._flush(self._pending)
        return {"count": int(self.counts.sum()), "class_counts": self.counts.tolist(), "shards": self.shards}

    def _flush(self, count: int) -> None:
        images, labels = np.concatenate(self._images), np.concatenate(self._labels)
        self._images, self._labels = [images[count:]], [labels[count:]]
        self._pending -= count
        images, labels = images[:count], labels[:count]
        self.counts += np.bincount(labels, minlength=len(self.counts))
        stem = self.out / f"{self.split}-{len(self.shards):05d}"
        entry: dict = {"count": count}
        files = {"labels": (Path(f"{stem}-labels.npy"), labels)}
        if self.encoding == "raw":
            files["images"] = (Path(f"{stem}-images.npy"), images)
        else:
            with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow encodes without the GIL
                blobs = list(pool.map(functools.partial(encode_jpeg, quality=self.quality), images))
            Path(f"{stem}-images.jpegs").write_bytes(b"".join(blobs))
            entry["images"] = f"{stem.name}-images.jpegs"
            entry["images_sha256"] = sha256_file(f"{stem}-images.jpegs")
            files["offsets"] = (Path(f"{stem}-offsets.npy"), np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64))
        for kind, (path, arr) in files.items():
            np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
            entry[kind] = path.name
            entry[f"{kind}_sha256"] = sha256_file(path)
        self.shards.append(entry)


def write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, shard_size: int,
                num_classes: int, encoding: str = "raw", jpeg_quality: int = 95) -> dict:
    """One split written at once (see SplitWriter); returns its manifest entry."""
    writer = SplitWriter(out_dir, split, shard_size, num_classes, encoding, jpeg_quality)
    writer.add(images, labels)
    return writer.close()


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """S×S×3 uint8 → baseline JPEG bytes (4:2:0, as most photographs are stored)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpegs(blobs: Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """JPEG byte arrays → N×S×S×3 uint8 on `device`: libjpeg-turbo on the CPU, nvJPEG (batched) on
    a CUDA device. All images of a split have the same size."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.from_numpy(b if b.flags.writeable else b.copy()) for b in map(np.asarray, blobs)]
    if not tensors:
        raise DataError("decode_jpegs got no images")
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec's; these still are libjpeg-turbo /
        # nvJPEG, and the GPU images (torchvision < 0.29) have no TorchCodec.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images).permute(0, 2, 3, 1).contiguous()


def read_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{dataset_dir} is not a prepared dataset ({e})") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("encoding", "raw") not in ENCODINGS:
        raise DataError(f"{path}: encoding {manifest.get('encoding')!r}, expected one of {ENCODINGS}")
    return manifest


class ShardedImages:
    """Random access to one split's images through memory-mapped shards: datasets larger than the
    device (or RAM) stream batch by batch instead of being loaded whole. Picklable (the maps are
    opened again in each DataLoader worker)."""

    def __init__(self, dataset_dir: str | Path, split: str) -> None:
        manifest = read_manifest(dataset_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{dataset_dir} has no split {split!r} (has {', '.join(manifest['splits'])})")
        self.dataset_dir, self.split = Path(dataset_dir), split
        self.encoding = manifest.get("encoding", "raw")
        self.counts = [sh["count"] for sh in manifest["splits"][split]["shards"]]
        self.starts = np.cumsum([0] + self.counts)
        size = manifest["stored_resolution"]
        self.image_shape = (size, size, 3)
        self.nbytes = len(self) * size * size * 3  # decoded, as the trainer holds them
        self._shard_files = manifest["splits"][split]["shards"]
        self._maps: list | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": None}

    @property
    def maps(self) -> list:
        if self._maps is None:
            open_ = functools.partial(np.load, mmap_mode="r", allow_pickle=False)
            if self.encoding == "raw":
                self._maps = [open_(self.dataset_dir / sh["images"]) for sh in self._shard_files]
            else:
                self._maps = [(np.memmap(self.dataset_dir / sh["images"], dtype=np.uint8, mode="r"),
                               np.load(self.dataset_dir / sh["offsets"], allow_pickle=False)) for sh in self._shard_files]
        return self._maps

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _by_shard(self, idx: np.ndarray):
        """(shard, rows of `idx`, their indices inside the shard) with sequential reads per shard."""
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            local = idx[rows] - self.starts[s]
            order = np.argsort(local)
            yield s, rows[order], local[order]

    def encoded(self, idx: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes of the images at `idx` (jpeg datasets), in `idx` order."""
        out: list = [None] * len(idx)
        for s, rows, local in self._by_shard(idx):
            blob, offsets = self.maps[s]
            for r, i in zip(rows, local):
                out[r] = np.array(blob[offsets[i]:offsets[i + 1]])
        return out

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """The decoded images at `idx` (any order), read shard by shard."""
        if self.encoding == "jpeg":
            return decode_jpegs(self.encoded(idx)).numpy()
        out = np.empty((len(idx),) + self.image_shape, dtype=np.uint8)
        for s, rows, local in self._by_shard(idx):
            out[rows] = self.maps[s][local]
        return out


def load_split(dataset_dir: str | Path, split: str, verify: bool = True, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images N×S×S×3 uint8, labels N int64) of one split, or of its first `limit` images (only the
    shards holding them are read: ImageNet's minitrain is 2 % of train); shard checksums verified."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_dir} has no split {split!r} (has {', '.join(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    if limit is not None:
        ends = np.cumsum([sh["count"] for sh in shards])
        shards = shards[:int(np.searchsorted(ends, limit)) + 1] if limit > 0 else []
    if verify:
        for shard in shards:
            for kind in ("images", "labels", "offsets"):
                path = dataset_dir / shard[kind] if kind in shard else None
                if path and sha256_file(path) != shard[f"{kind}_sha256"]:
                    raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
    size = manifest["stored_resolution"]
    if not shards:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    labels = np.concatenate([np.load(dataset_dir / sh["labels"], allow_pickle=False) for sh in shards])
    source = ShardedImages(dataset_dir, split)
    if source.encoding == "raw":
        images = np.concatenate([np.load(dataset_dir / sh["images"], allow_pickle=False) for sh in shards])
    else:
        images = np.concatenate([source.gather(np.arange(start, start + count))
                                 for start, count, _ in zip(source.starts[:-1], source.counts, shards)])
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def load_labels(dataset_dir: str | Path, split: str) -> np.ndarray:
    """The int64 labels of one split (checksums verified), without its images."""
    dataset_dir = Path(dataset_dir)
    split_entry = read_manifest(dataset_dir)["splits"].get(split)
    if split_entry is None:
        raise DataError(f"{dataset_dir} has no split {split!r}")
    out = []
    for shard in split_entry["shards"]:
        path = dataset_dir / shard["labels"]
        if sha256_file(path) != shard["labels_sha256"]:
            raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
        out.append(np.load(path, allow_pickle=False))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def decode_files(pairs: list[tuple[str, int]], size: int, max_pixels: int,
                 progress: Callable[[int], None] | None = None, workers: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decodes files in parallel threads (0: 64 for gs:// objects, whose reads mostly wait on the
    network, else 2 per CPU); returns (images, labels, skipped[{path, kind, reason}]) in input order."""
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
    shape = (0, size, size, 3)
    return (np.stack(images) if images else np.zeros(shape, np.uint8),
            np.asarray(labels, dtype=np.int64), skipped)


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
