"""Build a real user-style image folder (ImageFolder layout) from an installable package, to measure
`funmatch run --set data.source=DIR` as a new user would (issue 13).

Source: the Debian package `openclipart-png` (version 1:0.18+dfsg-19, Debian 12 bookworm; the Open Clip Art
Library 0.18 as PNG), licence: Creative Commons Public Domain Dedication (every image; see
/usr/share/doc/openclipart-png/copyright). Drawings made by people, not by us: mixed sizes (64 px to
16,000 px long side, a few over Pillow's decompression-bomb limit) and modes (RGBA, LA, P, RGB, L), mostly
with transparent backgrounds. It is clip art, not photographs: no package on PyPI, Debian or npm that
this workplace reaches ships a labelled photograph collection with a few hundred images per class
(searched: PyPI and npm lists for cifar/imagenette/flowers/pets/caltech/eurosat/emoji/bird datasets,
`apt-cache search` for wallpapers, backgrounds, icon themes, clip art, stamps; tuxpaint-stamps-default
has ~1000 PNGs over 16 categories, too few per class; birddata on PyPI only downloads at run time).

Classes: the library's own top-level categories. Per class, files are taken in sorted path order after
dropping byte-identical copies and the library's numbered variants of one drawing (`name_01.png`,
`name_02.png` keep the first), so a drawing and its recoloured twin cannot land in train and test; then
at most `--per-class` files. Files are copied unchanged (no resize, no conversion).

    apt-get install openclipart-png
    python tools/user_folder.py /tmp/clipart6            # 6 classes x <= 300 images
    funmatch run --set data.source=/tmp/clipart6 --output runs/clipart6
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from pathlib import Path

ROOT = Path("/usr/share/openclipart/png")
PACKAGE = "openclipart-png"
CLASSES = ("animals", "food", "people", "recreation", "signs_and_symbols", "transportation")
_VARIANT = re.compile(r"_\d+$")


def pick(class_dir: Path, limit: int) -> list[Path]:
    """The files of one category: unique bytes, one per numbered variant group, sorted, at most `limit`."""
    seen_bytes: set[str] = set()
    seen_stems: set[str] = set()
    out = []
    for path in sorted(class_dir.rglob("*.png")):
        stem = _VARIANT.sub("", path.stem)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen_bytes or stem in seen_stems:
            continue
        seen_bytes.add(digest)
        seen_stems.add(stem)
        out.append(path)
        if len(out) == limit:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="output folder (ImageFolder: DEST/<class>/<file>.png); replaced")
    p.add_argument("--per-class", type=int, default=300, help="at most this many images per class (default: 300)")
    p.add_argument("--classes", default=",".join(CLASSES), help=f"comma-separated categories (default: {CLASSES})")
    args = p.parse_args(argv)
    if not ROOT.is_dir():
        print(f"user_folder: {ROOT} not found: install it with `apt-get install {PACKAGE}`", file=sys.stderr)
        return 2
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    missing = [c for c in classes if not (ROOT / c).is_dir()]
    if missing:
        have = sorted(d.name for d in ROOT.iterdir() if d.is_dir())
        print(f"user_folder: no category {missing} in {ROOT}; expected some of {have}", file=sys.stderr)
        return 2
    shutil.rmtree(args.dest, ignore_errors=True)
    total = 0
    for c in classes:
        files = pick(ROOT / c, args.per_class)
        (args.dest / c).mkdir(parents=True)
        for f in files:
            rel = f.relative_to(ROOT / c)
            shutil.copyfile(f, args.dest / c / "__".join(rel.parts))  # flat: sub-categories in the name
        total += len(files)
        print(f"  {c:<20} {len(files)} images")
    print(f"user_folder: {total} images in {len(classes)} classes from {PACKAGE} in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
