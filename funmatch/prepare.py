"""Stage 1, data prep: a source (bundled demo, local or gs:// ImageFolder) → a dataset artifact.

Reads top to bottom: open the source, decode every image to the stored resolution (skipping and
listing unreadable files and copying them into `quarantine/`), split deterministically when the
source has no splits, write shards and the manifest. More unreadable files than
`data.max_bad_fraction` fails the stage. An archive source is extracted into `.source/` inside the
artifact and removed once decoded.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from funmatch import data
from funmatch.config import Config
from funmatch.errors import DataError
from funmatch.runtime import Stopwatch

log = logging.getLogger("funmatch.prepare")


def run(cfg: Config, out_dir: str | Path) -> dict:
    """Writes the dataset artifact into `out_dir`; returns its manifest."""
    clock = Stopwatch()
    d = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".source"  # an archive source is extracted here, then removed
    for stale in (work, out / data.QUARANTINE_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    source = data.open_source(d.source, d.root, d.download, workdir=work)
    size = d.stored_resolution

    # 1. Decode every split the source has (pre-decoded arrays or files).
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: list[dict] = []
    for split, (images, labels) in source.arrays.items():
        splits[split] = data.resize_array(images, size), labels
    total = sum(len(p) for p in source.files.values())
    with tqdm(total=total, desc="decode", unit="img", disable=total == 0, mininterval=2) as bar:
        for split, pairs in source.files.items():
            images, labels, bad = data.decode_files(pairs, size, d.max_image_pixels, bar.update)
            splits[split] = images, labels
            skipped += bad
    data.quarantine(source, skipped, out)  # bytes kept for a look, even when the stage fails below
    shutil.rmtree(work, ignore_errors=True)
    if total and len(skipped) > d.max_bad_fraction * total:
        raise DataError(f"{len(skipped)} of {total} images in {d.source!r} are unreadable, more than "
                        f"data.max_bad_fraction={d.max_bad_fraction}; first: {skipped[0]}")
    if sum(len(lab) for _, lab in splits.values()) == 0:
        raise DataError(f"data.source={d.source!r}: no readable images ({len(skipped)} unreadable)")
    for s in skipped:
        log.warning("skipped %s (%s): %s; copy in %s", s["path"], s["kind"], s["reason"], s.get("quarantine"))

    # 2. Deterministic, stratified splits when the source has none.
    origin = "source"
    if "all" in splits:
        images, labels = splits.pop("all")
        val_idx, test_idx, train_idx = data.stratified_split(labels, (d.val_fraction, d.test_fraction), d.split_seed)
        for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            splits[split] = images[idx], labels[idx]
        origin = f"stratified(seed={d.split_seed}, val={d.val_fraction}, test={d.test_fraction})"
    elif "train" in splits and ("val" not in splits or "test" not in splits):
        images, labels = splits["train"]
        fracs = tuple(f for s, f in (("val", d.val_fraction), ("test", d.test_fraction)) if s not in splits)
        parts = data.stratified_split(labels, fracs, d.split_seed)
        missing = [s for s in ("val", "test") if s not in splits]
        for split, idx in zip(missing, parts):
            splits[split] = images[idx], labels[idx]
        splits["train"] = images[parts[-1]], labels[parts[-1]]
        origin = f"source train/{'/'.join(s for s in ('val', 'test') if s not in missing)} + " \
                 f"stratified {'/'.join(missing)} (seed={d.split_seed})"
    if d.max_train_per_class:
        images, labels = splits["train"]
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:d.max_train_per_class]
                                       for c in range(len(source.classes))]))
        splits["train"] = images[keep], labels[keep]
    empty = [c for i, c in enumerate(source.classes) if not (splits["train"][1] == i).any()]
    if empty:
        raise DataError(f"data.source={d.source!r}: class(es) {empty} have no readable training images")

    # 3. Shards + manifest.
    manifest = {
        "format": data.FORMAT, "source": d.source, "description": source.description,
        "classes": source.classes, "num_classes": len(source.classes), "stored_resolution": size,
        "split_origin": origin,
        "splits": {s: data.write_split(out, s, *splits[s], d.shard_size, len(source.classes))
                   for s in data.SPLITS},
        "skipped": {"count": len(skipped), "by_kind": dict(sorted(Counter(s["kind"] for s in skipped).items())),
                    "quarantine": data.QUARANTINE_DIR if skipped else None, "files": skipped},
        "wall_s": clock(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("dataset: %s classes, train %d / val %d / test %d at %dpx, %d skipped (%.1fs)",
             manifest["num_classes"], *(manifest["splits"][s]["count"] for s in data.SPLITS), size,
             len(skipped), manifest["wall_s"])
    return manifest
