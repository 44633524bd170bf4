"""Stage 1, data prep: a source (bundled demo, local or gs:// ImageFolder) → a dataset artifact.

Reads top to bottom: open the source, split deterministically (on the labels) when the source has
no splits, decode every image to the stored resolution (skipping and listing unreadable files and
copying them into `quarantine/`) while writing shards (raw uint8 or JPEG, `data.encoding`) one at
a time, then the manifest. More unreadable files than
`data.max_bad_fraction` fails the stage. An archive source is extracted into `.source/` inside the
artifact and removed once decoded.
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
    work = out / ".source"  # an archive source is extracted here, then removed
    for stale in (work, out / sources.QUARANTINE_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    source = sources.open_source(d.source, d.root, d.download, workdir=work)
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
    if d.max_train_per_class:
        labels = _labels(parts["train"])
        keep = np.sort(
            np.concatenate([np.flatnonzero(labels == c)[: d.max_train_per_class] for c in range(len(source.classes))])
        )
        parts["train"] = _take(parts["train"], keep)

    # 2. Decode to the stored resolution and write shards as they fill (memory: one shard at a time).
    entries: dict[str, dict] = {}
    skipped: list[dict] = []
    total = sum(len(p) for p in source.files.values())
    with tqdm(total=total, desc="decode", unit="img", disable=total == 0, mininterval=2) as bar:
        for split in prepared.SPLITS:
            writer = prepared.SplitWriter(out, split, d.shard_size, len(source.classes), d.encoding, d.jpeg_quality)
            part = parts[split]
            if isinstance(part, tuple):  # pre-decoded arrays
                writer.add(sources.resize_array(part[0], size), part[1])
            else:
                for start in range(0, len(part), d.shard_size):
                    images, labels, bad = sources.decode_files(
                        part[start : start + d.shard_size], size, d.max_image_pixels, bar.update
                    )
                    writer.add(images, labels)
                    skipped += bad
            entries[split] = writer.close()
    sources.quarantine(source, skipped, out)  # bytes kept for a look, even when the stage fails below
    shutil.rmtree(work, ignore_errors=True)
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
    if empty:
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
