"""Bad images and hostile source trees: each is refused with its kind, or decoded correctly, and a
corrupt file is quarantined (bytes unchanged) while the run goes on."""

import io
import json
import os
import struct
import tarfile
import threading
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from funmatch import config
from funmatch.config import DataConfig
from funmatch.data import prepared, sources
from funmatch.errors import DataError
from funmatch.stages import prepare

# ---------------------------------------------------------------- builders


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w=48, h=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    full = _bytes(_noise(64, 64), "JPEG", quality=90)
    return full[: len(full) // 2]


def png_bomb(side=30_000) -> bytes:
    """A 1-bit PNG of side² pixels (9·10⁸ for 30k: ten times Pillow's default limit) in ~100 kB."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upright_pattern(side=32) -> np.ndarray:
    """Top-left quadrant red, top-right white, bottom half black: tells all 8 orientations apart."""
    a = np.zeros((side, side, 3), np.uint8)
    h = side // 2
    a[:h, :h] = (255, 0, 0)
    a[:h, h:] = (255, 255, 255)
    return a


# EXIF orientation -> the transform that turns the upright picture into the stored pixels
# (the inverse of what a viewer applies to display it)
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_rotated_jpeg(orientation: int) -> bytes:
    stored = Image.fromarray(upright_pattern()).transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _bytes(stored, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    img.paste((255, 0, 255, 0), (16, 0, 32, 32))  # right half green
    return _bytes(img, "JPEG", quality=95)


def png16() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    return _bytes(Image.fromarray(ramp), "PNG")


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.paste(1, (16, 0, 32, 32))  # left half index 0 (transparent), right half index 1 (blue)
    return _bytes(img, "PNG", transparency=0)


def one_pixel() -> bytes:
    return _bytes(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


GOOD_IMAGE = lambda seed: _bytes(_noise(seed=seed), "PNG")  # noqa: E731


# ---------------------------------------------------------------- refused, with the exact kind


@pytest.mark.parametrize(
    "blob, kind, words",
    [
        (truncated_jpeg(), "truncated", "truncated"),
        (b"", "empty", "0 bytes"),
        (b"name,label\ncat.jpg,3\n", "not_an_image", "cannot identify image"),  # a text file named .jpg
        (png_bomb(), "too_many_pixels", "max_image_pixels"),
    ],
)
def test_unusable_files_are_refused_with_their_kind(blob, kind, words):
    start = time.perf_counter()
    with pytest.raises(sources.BadImage, match=words) as e:
        sources.decode_image(blob, 16, DataConfig().max_image_pixels)  # the default limit
    assert e.value.kind == kind
    assert time.perf_counter() - start < 5  # the bomb is refused from its header, not decoded


def test_bomb_limit_is_the_configured_one():
    blob = _bytes(_noise(200, 100), "PNG")
    assert sources.decode_image(blob, 8, 200 * 100).shape == (4, 8, 3)  # exactly at the limit: fine
    with pytest.raises(sources.BadImage, match="more pixels than data.max_image_pixels=19999"):
        sources.decode_image(blob, 8, 200 * 100 - 1)


# ---------------------------------------------------------------- decoded, correctly


def test_cmyk_jpeg_comes_out_in_the_right_colours():
    out = sources.decode_image(cmyk_jpeg(), 32, 10**7).astype(int)
    assert np.abs(out[16, 4] - (255, 0, 0)).max() < 24  # not inverted, not channel-swapped
    assert np.abs(out[16, 28] - (0, 255, 0)).max() < 24


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_photo_comes_out_upright(orientation):
    blob = exif_rotated_jpeg(orientation)
    out = sources.decode_image(blob, 32, 10**7).astype(int)
    quad = lambda y, x: out[y : y + 16, x : x + 16].reshape(-1, 3).mean(0)  # noqa: E731
    assert np.abs(quad(0, 0) - (255, 0, 0)).max() < 30  # red top-left
    assert np.abs(quad(0, 16) - (255, 255, 255)).max() < 30  # white top-right
    assert quad(16, 0).max() < 30 and quad(16, 16).max() < 30  # black bottom half
    # the same pixels without the EXIF tag are not upright: the check above can fail
    with Image.open(io.BytesIO(blob)) as img:
        raw = np.asarray(img.convert("RGB")).astype(int)
    assert np.abs(raw - out).max() > 100


def test_16bit_png_keeps_its_whole_range():
    with Image.open(io.BytesIO(png16())) as img:
        assert img.mode == "I;16"
    row = sources.decode_image(png16(), 64, 10**7)[32, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253  # scaled 65535 → 255, not clipped at 255/65535
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) > 50  # a ramp, not two levels


def test_palette_png_transparency_is_composited_over_white():
    with Image.open(io.BytesIO(palette_png_with_transparency())) as img:
        assert img.mode == "P" and img.info["transparency"] == 0
    out = sources.decode_image(palette_png_with_transparency(), 32, 10**7)
    assert (out[:, :14] == 255).all()  # transparent green → white, not green, not black
    assert (out[:, 18:] == (0, 0, 255)).all()


def test_one_pixel_image_is_kept_whole_not_upscaled():
    out = sources.decode_image(one_pixel(), 16, 10**7)
    assert out.shape == (1, 1, 3) and (out == (10, 200, 30)).all()
    canvas, frames = sources.letterbox([out], 16)
    assert frames.tolist() == [[1, 1]] and (canvas[0, 0, 0] == (10, 200, 30)).all() and canvas[0, 1:].max() == 0


# ---------------------------------------------------------------- quarantine

BAD_FILES = {  # name in class 'cat' -> (bytes, kind)
    "truncated.jpg": (truncated_jpeg(), "truncated"),
    "empty.jpg": (b"", "empty"),
    "labels.jpg": (b"name,label\ncat.jpg,3\n", "not_an_image"),
    "nested/bomb.png": (png_bomb(), "too_many_pixels"),
}
ODD_BUT_GOOD = {
    "cmyk.jpg": cmyk_jpeg(),
    "exif6.jpg": exif_rotated_jpeg(6),
    "deep.png": png16(),
    "palette.png": palette_png_with_transparency(),
    "dot.png": one_pixel(),
}


def make_tree(root, good_per_class=8, bad=True):
    for c in ("cat", "dog"):
        for i in range(good_per_class):
            _write(root / c / f"{i}.png", GOOD_IMAGE(i))
    for name, blob in ODD_BUT_GOOD.items():
        _write(root / "dog" / name, blob)
    if bad:
        for name, (blob, _) in BAD_FILES.items():
            _write(root / "cat" / name, blob)
    return root


def _write(path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)


def _cfg(source, *extra):
    return config.load("demo", [f"data.source={source}", "data.stored_resolution=16", *extra])


def test_corrupt_files_are_quarantined_and_the_run_goes_on(tmp_path):
    root = make_tree(tmp_path / "src")
    manifest = prepare.run(_cfg(root, "data.max_bad_fraction=0.25"), tmp_path / "out")
    skipped = manifest["skipped"]
    assert skipped["count"] == 4
    assert skipped["by_kind"] == {"empty": 1, "not_an_image": 1, "too_many_pixels": 1, "truncated": 1}
    by_name = {e["path"][len(str(root)) + 1 :]: e for e in skipped["files"]}
    assert set(by_name) == {f"cat/{n}" for n in BAD_FILES}
    for name, (blob, kind) in BAD_FILES.items():
        entry = by_name[f"cat/{name}"]
        assert entry["kind"] == kind and entry["quarantine"] == f"quarantine/cat/{name}"
        assert (tmp_path / "out" / entry["quarantine"]).read_bytes() == blob  # bytes unchanged
        assert entry["bytes"] == len(blob)
    assert sorted(
        p.relative_to(tmp_path / "out" / "quarantine").as_posix()
        for p in (tmp_path / "out" / "quarantine").rglob("*")
        if p.is_file()
    ) == sorted(f"cat/{n}" for n in BAD_FILES)
    good = 2 * 8 + len(ODD_BUT_GOOD)
    assert sum(manifest["splits"][s]["count"] for s in prepared.SPLITS) == good  # every good image kept
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == skipped


def test_too_many_bad_files_fail_but_are_still_quarantined(tmp_path):
    root = make_tree(tmp_path / "src", good_per_class=4)  # 4 bad of 4+4+5+4 = 17 files
    with pytest.raises(DataError, match="4 of 17 images .* more than data.max_bad_fraction=0.2"):
        prepare.run(_cfg(root, "data.max_bad_fraction=0.2"), tmp_path / "out")
    assert len([p for p in (tmp_path / "out" / "quarantine").rglob("*") if p.is_file()]) == 4


def test_quarantine_stays_inside_the_artifact_for_dotdot_names(tmp_path):
    """gs:// object names may hold '..': the copy still lands below quarantine/."""
    root = tmp_path / "a" / "b" / "src"
    (root / "cat").mkdir(parents=True)
    (tmp_path / "evil.jpg").write_bytes(b"junk")
    path = f"{root}/cat/../../../../evil.jpg"  # names tmp_path/evil.jpg
    entries = [{"path": path, "kind": "not_an_image", "reason": "x"}]
    out = tmp_path / "out"
    sources.quarantine(sources.Source(["cat"], {}, "t", root=str(root)), entries, out)
    assert entries[0]["quarantine"] == "quarantine/cat/evil.jpg"
    assert (out / "quarantine" / "cat" / "evil.jpg").read_bytes() == b"junk"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("evil.jpg")) == [
        "evil.jpg",
        "out/quarantine/cat/evil.jpg",
    ]  # the original and its copy, nothing elsewhere


# ---------------------------------------------------------------- a symlink loop in the source tree


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path):
    root = tmp_path / "src"
    for c in ("cat", "dog"):
        for i in range(3):
            _write(root / c / f"{i}.png", GOOD_IMAGE(i))
    (root / "cat" / "sub").mkdir()
    os.symlink("..", root / "cat" / "sub" / "up")  # cat/sub/up -> cat: a loop
    os.symlink("../cat", root / "dog" / "cats")  # dog/cats -> cat: the same files again
    os.symlink("0.png", root / "cat" / "again.png")  # a second name for one file

    result: dict[str, sources.Source] = {}
    walker = threading.Thread(target=lambda: result.update(src=sources.folder_source(str(root))), daemon=True)
    walker.start()
    walker.join(timeout=30)
    assert not walker.is_alive(), "walking a tree with a symlink loop did not terminate"
    files = [f for f, _ in result["src"].files["all"]]
    real = [os.path.realpath(f) for f in files]
    assert len(files) == 6 and len(set(real)) == 6  # 6 real files, none twice
    assert sorted(f[len(str(root)) + 1 :] for f in files) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]


# ---------------------------------------------------------------- archives as data.source


def _tar(path, root, mode):
    with tarfile.open(path, mode) as t:
        t.add(root, arcname="flowers")  # wrapped in one top folder, as `tar czf x.tgz flowers/` does


def _zip(path, root):
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())


@pytest.mark.parametrize("ext", [".tar", ".tar.gz", ".tgz", ".zip"])
def test_archive_source_is_extracted_decoded_and_quarantined(tmp_path, ext):
    tree = make_tree(tmp_path / "tree", good_per_class=4)
    archive = tmp_path / f"data{ext}"
    if ext == ".zip":
        _zip(archive, tree)
    else:
        _tar(archive, tree, {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz"}[ext])
    manifest = prepare.run(_cfg(archive, "data.max_bad_fraction=0.3"), tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog"] and manifest["description"] == f"archive: {archive}"
    assert sum(manifest["splits"][s]["count"] for s in prepared.SPLITS) == 8 + len(ODD_BUT_GOOD)
    assert manifest["skipped"]["count"] == 4
    paths = sorted(e["path"] for e in manifest["skipped"]["files"])
    assert paths == sorted(f"{archive}!/cat/{n}" for n in BAD_FILES)
    assert (tmp_path / "out" / "quarantine" / "cat" / "truncated.jpg").read_bytes() == BAD_FILES["truncated.jpg"][0]
    assert not (tmp_path / "out" / ".source").exists()  # the extracted copy is gone


def _tar_with(path, member: tarfile.TarInfo, blob: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as t:
        ok = tarfile.TarInfo("cat/0.png")
        good = GOOD_IMAGE(0)
        ok.size = len(good)
        t.addfile(ok, io.BytesIO(good))
        member.size = len(blob) if member.isfile() else 0
        t.addfile(member, io.BytesIO(blob) if member.isfile() else None)


def _info(name, kind=tarfile.REGTYPE, link=""):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize(
    "member, words",
    [
        (_info("../evil.jpg"), "'../evil.jpg' contains '..'"),
        (_info("cat/../../evil.jpg"), "'cat/../../evil.jpg' contains '..'"),
        (_info("/tmp/evil.jpg"), "'/tmp/evil.jpg' is an absolute path"),
        (_info("cat/link.jpg", tarfile.SYMTYPE, "../../evil.jpg"), "'cat/link.jpg' is a link to '../../evil.jpg'"),
        (_info("cat/abs.jpg", tarfile.SYMTYPE, "/etc/passwd"), "'cat/abs.jpg' is a link to '/etc/passwd'"),
        (_info("cat/hard.jpg", tarfile.LNKTYPE, "../evil.jpg"), "'cat/hard.jpg' is a link to '../evil.jpg'"),
        (_info("cat/dev", tarfile.CHRTYPE), "'cat/dev' is a device"),
    ],
)
def test_tar_member_escaping_the_tree_is_rejected(tmp_path, member, words):
    archive = tmp_path / "x" / "data.tgz"
    archive.parent.mkdir()
    _tar_with(archive, member, b"payload")
    with pytest.raises(DataError, match=f"archive member {words}".replace("(", r"\(").replace(")", r"\)")):
        prepare.run(_cfg(archive), tmp_path / "out")
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "x" / "evil.jpg").exists()
    assert not (tmp_path / "out" / ".source" / "tree" / "cat").exists()  # refused before extracting anything


@pytest.mark.parametrize(
    "name, words",
    [
        ("../evil.jpg", "contains '..'"),
        ("/abs/evil.jpg", "is an absolute path"),
        ("cat/..\\..\\evil.jpg", "contains '..'"),
    ],
)
def test_zip_member_escaping_the_tree_is_rejected(tmp_path, name, words):
    archive = tmp_path / "x" / "data.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cat/0.png", GOOD_IMAGE(0))
        z.writestr(zipfile.ZipInfo(name), b"payload")
    with pytest.raises(DataError, match=f"archive member {name!r} {words}".replace("\\", "\\\\")):
        prepare.run(_cfg(archive), tmp_path / "out")
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "x" / "evil.jpg").exists()


def test_missing_or_garbage_archive_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a file"):
        sources.check_source(str(tmp_path / "nope.tar.gz"))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable archive"):
        prepare.run(_cfg(tmp_path / "junk.zip"), tmp_path / "out")
