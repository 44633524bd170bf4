"""The prepared dataset artifact, what data prep writes and every later stage reads.

A directory: `manifest.json` (classes, split sizes, source, stored resolution, encoding, shard
checksums, skipped files) and per split shards of images, int64 labels and int32 frames. Each image is
the whole source image, aspect kept, long side = the stored resolution S, at the top-left of an S×S
canvas with zeros elsewhere; its frame (height, width) says which part is the image (`load_frames`,
`ShardedImages.frames`). Images are stored `raw` (`.npy` uint8 N×S×S×3, RGB: small datasets, loaded
whole onto the GPU) or `jpeg` (the canvases JPEG-encoded back to back plus byte offsets: ImageNet-size
datasets, streamed and decoded in parallel by the trainer's loader). `.npy` loads without pickle and
memory-maps. Data order is a pure function of (seed, step): `batch_indices`.

Format "funmatch-dataset/2"; a "funmatch-dataset/1" artifact (centre-cropped squares, no frame files)
still reads, every frame being the whole canvas.
"""

from __future__ import annotations

import functools
import io
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from funmatch import storage
from funmatch.errors import DataError

FORMAT = "funmatch-dataset/2"
FORMATS = ("funmatch-dataset/1", FORMAT)  # what reads: /1 has no frame files (each frame is the whole canvas)
SPLITS = ("train", "val", "test")
ENCODINGS = ("raw", "jpeg")  # how the artifact stores images: uint8 arrays, or JPEG bytes
NO_LABEL = -1  # the label of an image without one (data.labels=none, the images of distill.images)


def labelled_splits(manifest: dict) -> tuple[str, ...]:
    """The splits whose labels are class indices: none with `labels: none`, val and test when the train
    images came from `distill_images` (out-of-domain), else all three."""
    if manifest.get("labels") == "none":
        return ()
    return ("val", "test") if manifest.get("distill_images") else SPLITS


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded per-class split of indices into len(fractions)+1 parts (the rest goes last)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            parts[i].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


class SplitWriter:
    """Writes one split's shards as images arrive, `shard_size` at a time (memory stays bounded by
    one shard). `raw`: `.npy` uint8 N×S×S×3; `jpeg`: the images JPEG-encoded back to back in a
    `.jpegs` file with an `.npy` of N+1 byte offsets (3–7× smaller: ImageNet streams from shards).
    Every shard has its labels (`-labels.npy`) and frames (`-frames.npy`, int32 N×2 (h, w))."""

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        shard_size: int,
        num_classes: int,
        encoding: str = "raw",
        jpeg_quality: int = 95,
    ) -> None:
        if encoding not in ENCODINGS:
            raise DataError(f"data.encoding={encoding!r} is not allowed; expected one of {ENCODINGS}")
        self.out, self.split, self.shard_size, self.encoding, self.quality = (
            Path(out_dir),
            split,
            shard_size,
            encoding,
            jpeg_quality,
        )
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.count = 0
        self.shards: list[dict] = []
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._frames: list[np.ndarray] = []
        self._pending = 0

    def add(self, images: np.ndarray, labels: np.ndarray, frames: np.ndarray | None = None) -> None:
        """Queues N×S×S×3 canvases with their labels and frames (None: each the whole canvas)."""
        self._images.append(images)
        self._labels.append(np.asarray(labels, dtype=np.int64))
        self._frames.append(full_frames(len(images), images.shape[1]) if frames is None else frames.astype(np.int32))
        self._pending += len(images)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> dict:
        """Writes the last partial shard; returns the split's manifest entry."""
        if self._pending:
            self._flush(self._pending)
        return {"count": self.count, "class_counts": self.counts.tolist(), "shards": self.shards}

    def _flush(self, count: int) -> None:
        images, labels = np.concatenate(self._images), np.concatenate(self._labels)
        frames = np.concatenate(self._frames)
        self._images, self._labels, self._frames = [images[count:]], [labels[count:]], [frames[count:]]
        self._pending -= count
        images, labels, frames = images[:count], labels[:count], frames[:count]
        self.counts += np.bincount(labels[labels != NO_LABEL], minlength=len(self.counts))
        self.count += count
        stem = self.out / f"{self.split}-{len(self.shards):05d}"
        entry: dict = {"count": count}
        files = {"labels": (Path(f"{stem}-labels.npy"), labels), "frames": (Path(f"{stem}-frames.npy"), frames)}
        if self.encoding == "raw":
            files["images"] = (Path(f"{stem}-images.npy"), images)
        else:
            with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow encodes without the GIL
                blobs = list(pool.map(functools.partial(encode_jpeg, quality=self.quality), images))
            Path(f"{stem}-images.jpegs").write_bytes(b"".join(blobs))
            entry["images"] = f"{stem.name}-images.jpegs"
            entry["images_sha256"] = storage.sha256_file(f"{stem}-images.jpegs")
            files["offsets"] = (Path(f"{stem}-offsets.npy"), np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64))
        for kind, (path, arr) in files.items():
            np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
            entry[kind] = path.name
            entry[f"{kind}_sha256"] = storage.sha256_file(path)
        self.shards.append(entry)


def write_split(
    out_dir: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    shard_size: int,
    num_classes: int,
    encoding: str = "raw",
    jpeg_quality: int = 95,
    frames: np.ndarray | None = None,
) -> dict:
    """One split written at once (see SplitWriter; `frames` None: whole canvases); returns its manifest entry."""
    writer = SplitWriter(out_dir, split, shard_size, num_classes, encoding, jpeg_quality)
    writer.add(images, labels, frames)
    return writer.close()


def full_frames(n: int, size: int) -> np.ndarray:
    """N×2 int32 frames that are the whole S×S canvas."""
    return np.full((n, 2), size, np.int32)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """S×S×3 uint8 canvas → baseline JPEG bytes (4:2:0, as most photographs are stored)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpegs(blobs: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """JPEG byte arrays (numpy or CPU tensors) → N×S×S×3 uint8 on `device`: libjpeg-turbo on the CPU,
    nvJPEG (batched) on a CUDA device. All images of a split have the same size."""
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
    if manifest.get("format") not in FORMATS:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected one of {FORMATS}")
    if manifest.get("encoding", "raw") not in ENCODINGS:
        raise DataError(f"{path}: encoding {manifest.get('encoding')!r}, expected one of {ENCODINGS}")
    return manifest


class ShardedImages:
    """Random access to one split's images through memory-mapped shards: datasets larger than the
    device (or RAM) stream batch by batch instead of being loaded whole; `frames(idx)` gives their
    frames. Picklable (the maps are opened again in each DataLoader worker)."""

    def __init__(self, dataset_dir: str | Path, split: str) -> None:
        manifest, shards = _split_shards(Path(dataset_dir), split)
        self.dataset_dir, self.split = Path(dataset_dir), split
        self.encoding = manifest.get("encoding", "raw")
        self.counts = [sh["count"] for sh in shards]
        self.starts = np.cumsum([0] + self.counts)
        size = manifest["stored_resolution"]
        self.image_shape = (size, size, 3)
        self.nbytes = len(self) * size * size * 3  # decoded, as the trainer holds them
        self._shard_files = shards
        self._maps: list | None = None
        self._frames: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": None, "_frames": None}

    @property
    def maps(self) -> list:
        if self._maps is None:
            open_ = functools.partial(np.load, mmap_mode="r", allow_pickle=False)
            if self.encoding == "raw":
                self._maps = [open_(self.dataset_dir / sh["images"]) for sh in self._shard_files]
            else:
                self._maps = [
                    (
                        np.memmap(self.dataset_dir / sh["images"], dtype=np.uint8, mode="r"),
                        np.load(self.dataset_dir / sh["offsets"], allow_pickle=False),
                    )
                    for sh in self._shard_files
                ]
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
            for r, i in zip(rows, local, strict=True):
                out[r] = np.array(blob[offsets[i] : offsets[i + 1]])
        return out

    def frames(self, idx: np.ndarray) -> np.ndarray:
        """The int32 frames (h, w) of the images at `idx` (N×2; the split's frames are read once, unhashed)."""
        if self._frames is None:
            self._frames = _read_frames(self.dataset_dir, self._shard_files, self.image_shape[0], verify=False)
        return self._frames[idx]

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """The decoded images at `idx` (any order), read shard by shard."""
        if self.encoding == "jpeg":
            return decode_jpegs(self.encoded(idx)).numpy()
        out = np.empty((len(idx),) + self.image_shape, dtype=np.uint8)
        for s, rows, local in self._by_shard(idx):
            out[rows] = self.maps[s][local]
        return out


def load_split(dataset_dir: str | Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images N×S×S×3 uint8 canvases, labels N int64) of one whole split; shard checksums verified (a
    sample of a large split: `load_sample`; the frames: `load_frames`)."""
    dataset_dir = Path(dataset_dir)
    manifest, shards = _split_shards(dataset_dir, split)
    if verify:
        for shard in shards:
            for kind in ("images", "labels", "offsets", "frames"):
                path = dataset_dir / shard[kind] if kind in shard else None
                if path and storage.sha256_file(path) != shard[f"{kind}_sha256"]:
                    raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
    size = manifest["stored_resolution"]
    if not shards:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    labels = np.concatenate([np.load(dataset_dir / sh["labels"], allow_pickle=False) for sh in shards])
    source = ShardedImages(dataset_dir, split)
    if source.encoding == "raw":
        images = np.concatenate([np.load(dataset_dir / sh["images"], allow_pickle=False) for sh in shards])
    else:
        images = np.concatenate(
            [
                source.gather(np.arange(start, start + count))
                for start, count in zip(source.starts[:-1], source.counts, strict=True)
            ]
        )
    return images, labels


def load_labels(dataset_dir: str | Path, split: str) -> np.ndarray:
    """The int64 labels of one split (checksums verified), without its images."""
    dataset_dir = Path(dataset_dir)
    split_entry = read_manifest(dataset_dir)["splits"].get(split)
    if split_entry is None:
        raise DataError(f"{dataset_dir} has no split {split!r}")
    out = []
    for shard in split_entry["shards"]:
        path = dataset_dir / shard["labels"]
        if storage.sha256_file(path) != shard["labels_sha256"]:
            raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
        out.append(np.load(path, allow_pickle=False))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified sample of `size` rows (all rows when fewer): each class
    gets its share size·n_c/N rounded down, the rows left over go to the largest remainders (ties broken
    by the seed); the rows of each class are a seeded random subset."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / n
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((rng.permutation(len(classes)), -(quota - take)))  # largest remainder, seeded ties
    take[order[: size - int(take.sum())]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def _split_shards(dataset_dir: Path, split: str) -> tuple[dict, list[dict]]:
    """(manifest, the split's shard entries); DataError for a split the artifact lacks."""
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_dir} has no split {split!r} (has {', '.join(manifest['splits'])})")
    return manifest, manifest["splits"][split]["shards"]


def _read_frames(dataset_dir: Path, shards: list[dict], size: int, verify: bool) -> np.ndarray:
    """The int32 N×2 frames of `shards`; a shard without a frame file (format /1) is whole canvases."""
    out = [np.zeros((0, 2), np.int32)]
    for shard in shards:
        if "frames" not in shard:
            out.append(full_frames(shard["count"], size))
            continue
        path = dataset_dir / shard["frames"]
        if verify and storage.sha256_file(path) != shard["frames_sha256"]:
            raise DataError(f"{path}: checksum mismatch, the dataset artifact is corrupt")
        out.append(np.load(path, allow_pickle=False).astype(np.int32, copy=False))
    return np.concatenate(out)


def load_frames(dataset_dir: str | Path, split: str, sample: tuple[int, int] | None = None) -> np.ndarray:
    """The int32 frames (h, w) of one split's images (N×2, checksums verified): the valid top-left region
    of each stored canvas. `sample=(size, seed)`: only the rows `load_sample(..., size, seed)` returns,
    in its order."""
    dataset_dir = Path(dataset_dir)
    manifest, shards = _split_shards(dataset_dir, split)
    frames = _read_frames(dataset_dir, shards, manifest["stored_resolution"], verify=True)
    return frames if sample is None else frames[_sample_rows(dataset_dir, split, *sample)[1]]


def _sample_rows(dataset_dir: str | Path, split: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the split's labels, the rows of its `stratified_sample`)."""
    labels = load_labels(dataset_dir, split)
    return labels, stratified_sample(labels, size, seed)


def load_sample(dataset_dir: str | Path, split: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `stratified_sample(labels, size, seed)` of one split: the labels are read whole
    (checksums verified), then only the sampled images, row by row through the memory-mapped shards (the
    image shards are not hashed: that would read the whole split). Their frames: `load_frames(...,
    sample=(size, seed))`."""
    labels, idx = _sample_rows(dataset_dir, split, size, seed)
    source = ShardedImages(dataset_dir, split)
    if not len(idx):
        return np.zeros((0,) + source.image_shape, np.uint8), np.zeros(0, np.int64)
    return source.gather(idx), labels[idx]


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
        parts.append(_epoch_permutation(epoch, n, seed)[offset : offset + take])
        pos += take
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(epoch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
