"""Stage 1, data prep: a source (bundled demo, local or gs:// ImageFolder) → a dataset artifact.

Reads top to bottom: open the source, split deterministically (on the labels) when the source has
no splits, decode every image, whole and letterboxed, to the stored resolution (skipping and listing
unreadable files and copying them into `quarantine/`) while writing shards (raw uint8 or JPEG,
`data.encoding`, with each image's frame) one at a time, then the manifest. More unreadable files than
`data.max_bad_fraction` fails the stage. An archive source is extracted into `.source/` inside the
artifact and removed once decoded.

`data.labels=none`: the source is images without labels, split at random (seeded) with label -1
(`prepared.NO_LABEL`) everywhere. `distill.images` (out-of-domain, paper §3.8): val/test come from
`data.source` as usual, the train split is that source's images with label -1 (`.images/` for an archive).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from funmatch.config import Config
from funmatch.data import prepared, sources
from funmatch.errors import DataError
from funmatch.runtime import Stopwatch

log = logging.getLogger(__name__)
Part = tuple[np.ndarray, np.ndarray] | list[tuple[str, int]]  # a split: decoded arrays, or (file, label) pairs


def run(cfg: Config, out_dir: str | Path) -> dict:
    """Writes the dataset artifact into `out_dir`; returns its manifest."""
    clock = Stopwatch()
    d = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work, images_work = out / ".source", out / ".images"  # archive sources are extracted here, then removed
    for stale in (work, images_work, out / sources.QUARANTINE_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    if d.labels == "none":
        source = sources.unlabelled_source(d.source, d.root, d.download, workdir=work)
    else:
        source = sources.open_source(d.source, d.root, d.download, workdir=work)
    ood = cfg.distill.images  # out-of-domain: the train split's images, labels ignored
    images_source = (
        sources.unlabelled_source(ood, d.root, d.download, images_work, key="distill.images") if ood else None
    )
    size = d.stored_resolution

    # 1. Deterministic, stratified splits where the source has none, decided on the labels before any
    # decoding: which split a file lands in does not depend on which other files are unreadable.
    parts: dict[str, Part] = {**source.arrays, **source.files}
    origin = "source"
    if "all" in parts:
        whole = parts.pop("all")
        val_idx, test_idx, train_idx = prepared.stratified_split(
            _labels(whole), (d.val_fraction, d.test_fraction), d.split_seed
        )
        parts |= {
            split: _take(whole, idx) for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        }
        origin = f"stratified(seed={d.split_seed}, val={d.val_fraction}, test={d.test_fraction})"
        if d.labels == "none":  # one label, NO_LABEL: a seeded random split
            origin = f"random(seed={d.split_seed}, val={d.val_fraction}, test={d.test_fraction}), no labels"
    elif "train" in parts and ("val" not in parts or "test" not in parts):
        missing = [s for s in ("val", "test") if s not in parts]
        fracs = tuple(f for s, f in (("val", d.val_fraction), ("test", d.test_fraction)) if s in missing)
        train = parts["train"]
        cut = prepared.stratified_split(_labels(train), fracs, d.split_seed)
        parts |= {split: _take(train, idx) for split, idx in zip(missing, cut[:-1], strict=True)}
        parts["train"] = _take(train, cut[-1])
        origin = (
            f"source train/{'/'.join(s for s in ('val', 'test') if s not in missing)} + "
            f"stratified {'/'.join(missing)} (seed={d.split_seed})"
        )
    if images_source:  # paper §3.8: distil on other images, evaluate on data.source's val/test
        parts["train"] = images_source.arrays["all"] if images_source.arrays else images_source.files["all"]
        origin += f"; train: {ood} (labels ignored)"
    if d.max_train_per_class:  # unlabelled train images: the first N
        labels = _labels(parts["train"])
        keep = np.sort(
            np.concatenate([np.flatnonzero(labels == c)[: d.max_train_per_class] for c in np.unique(labels)])
        )
        parts["train"] = _take(parts["train"], keep)

    # 2. Decode to the stored resolution and write shards as they fill (memory: one shard at a time).
    entries: dict[str, dict] = {}
    skipped: list[dict] = []
    total = sum(len(p) for p in parts.values() if isinstance(p, list))  # files to decode
    with tqdm(total=total, desc="decode", unit="img", disable=total == 0, mininterval=2) as bar:
        for split in prepared.SPLITS:
            writer = prepared.SplitWriter(out, split, d.shard_size, len(source.classes), d.encoding, d.jpeg_quality)
            part = parts[split]
            if isinstance(part, tuple):  # pre-decoded arrays
                images, frames = sources.resize_array(part[0], size)
                writer.add(images, part[1], frames)
            else:
                for start in range(0, len(part), d.shard_size):
                    images, frames, labels, bad = sources.decode_files(
                        part[start : start + d.shard_size], size, d.max_image_pixels, bar.update
                    )
                    writer.add(images, labels, frames)
                    skipped += bad
            entries[split] = writer.close()
    # bytes kept for a look, even when the stage fails below; distill.images' files below their own root
    ood_files = {f for f, _ in parts["train"]} if images_source and isinstance(parts["train"], list) else set()
    sources.quarantine(source, [s for s in skipped if s["path"] not in ood_files], out)
    if images_source:
        sources.quarantine(images_source, [s for s in skipped if s["path"] in ood_files], out)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(images_work, ignore_errors=True)
    if total and len(skipped) > d.max_bad_fraction * total:
        raise DataError(
            f"{len(skipped)} of {total} images in {d.source!r} are unreadable, more than "
            f"data.max_bad_fraction={d.max_bad_fraction}; first: {skipped[0]}"
        )
    if sum(e["count"] for e in entries.values()) == 0:
        raise DataError(f"data.source={d.source!r}: no readable images ({len(skipped)} unreadable)")
    for s in skipped:
        log.warning("skipped %s (%s): %s; copy in %s", s["path"], s["kind"], s["reason"], s.get("quarantine"))
    empty = [c for c, count in zip(source.classes, entries["train"]["class_counts"], strict=True) if not count]
    if empty and not images_source:  # out-of-domain train images have no classes
        raise DataError(f"data.source={d.source!r}: class(es) {empty} have no readable training images")

    # 3. Shards + manifest.
    manifest: dict[str, Any] = {
        "format": prepared.FORMAT,
        "source": d.source,
        "description": source.description,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "stored_resolution": size,
        "encoding": d.encoding,
        **({"jpeg_quality": d.jpeg_quality} if d.encoding == "jpeg" else {}),
        "split_origin": origin,
        "labels": d.labels,  # none: every label is prepared.NO_LABEL (-1); teacher and student agreement only
        **({"distill_images": {"source": ood, "description": images_source.description}} if images_source else {}),
        "splits": entries,
        "skipped": {
            "count": len(skipped),
            "by_kind": dict(sorted(Counter(s["kind"] for s in skipped).items())),
            "quarantine": sources.QUARANTINE_DIR if skipped else None,
            "files": skipped,
        },
        "wall_s": clock(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info(
        "dataset: %s classes, train %d / val %d / test %d at %dpx, %d skipped (%.1fs)",
        manifest["num_classes"],
        *(manifest["splits"][s]["count"] for s in prepared.SPLITS),
        size,
        len(skipped),
        manifest["wall_s"],
    )
    return manifest


def _labels(part: Part) -> np.ndarray:
    return part[1] if isinstance(part, tuple) else np.asarray([label for _, label in part], dtype=np.int64)


def _take(part: Part, idx: np.ndarray) -> Part:
    return (part[0][idx], part[1][idx]) if isinstance(part, tuple) else [part[i] for i in idx]
