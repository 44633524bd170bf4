import io
import json

import numpy as np
import pytest
from PIL import Image

from funmatch import config
from funmatch.data import prepared, sources
from funmatch.data import splits as tfds_splits
from funmatch.errors import DataError
from funmatch.stages import prepare


def _save(path, img: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def _photo(size=(40, 30), seed=0, mode="RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def make_folder(root, per_class=6, classes=("cat", "dog", "fox")):
    """An ImageFolder tree with every supported format and mode, some in nested folders."""
    fmts = [
        ("JPEG", "jpg", "RGB"),
        ("PNG", "png", "L"),
        ("WEBP", "webp", "RGB"),
        ("BMP", "bmp", "RGB"),
        ("PNG", "png", "P"),
        ("PNG", "png", "RGBA"),
        ("JPEG", "jpg", "CMYK"),
    ]
    for c in classes:
        for i in range(per_class):
            fmt, ext, mode = fmts[i % len(fmts)]
            sub = "nested/deeper/" if i % 3 == 0 else ""
            _save(root / c / f"{sub}{i}.{ext}", _photo((30 + i, 20 + 2 * i), seed=i, mode=mode), fmt)
    return root


def test_decode_converts_every_mode_to_rgb_at_stored_size():
    for mode in ["L", "P", "RGBA", "CMYK", "LA", "I;16"]:
        img = _photo(mode="RGB").convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
            assert img.mode == "I;16"
        buf = io.BytesIO()
        img.save(buf, "TIFF" if mode in ("CMYK", "LA", "I;16") else "PNG")
        out = sources.decode_image(buf.getvalue(), 24, 10**7)
        assert out.shape == (18, 24, 3) and out.dtype == np.uint8  # 40×30: long side to 24, aspect kept
        assert out.max() > 50  # 16-bit scaled down, not clipped to black/white


def test_decode_refuses_garbage_and_bombs():
    with pytest.raises(ValueError):
        sources.decode_image(b"not an image", 16, 10**7)
    buf = io.BytesIO()
    _photo((200, 200)).save(buf, "PNG")
    with pytest.raises(ValueError, match="max_image_pixels"):
        sources.decode_image(buf.getvalue(), 16, 100 * 100)


def test_folder_source_finds_files_recursively_and_sorted_classes(tmp_path):
    src = sources.folder_source(str(make_folder(tmp_path / "src")))
    assert src.classes == ["cat", "dog", "fox"]
    assert len(src.files["all"]) == 18
    assert any("nested/deeper" in f for f, _ in src.files["all"])


def test_prepare_folder_splits_stratified_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "src", per_class=10)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cfg = config.load(
        "demo",
        [
            f"data.source={root}",
            "data.stored_resolution=16",
            "data.max_bad_fraction=0.1",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
        ],
    )
    m1 = prepare.run(cfg, tmp_path / "a")
    m2 = prepare.run(cfg, tmp_path / "b")
    assert m1["splits"] == m2["splits"]  # same seed, same split, same bytes
    assert m1["skipped"]["count"] == 1 and m1["skipped"]["files"][0]["path"].endswith("broken.jpg")
    counts = np.array([m1["splits"][s]["class_counts"] for s in prepared.SPLITS])
    assert counts.sum(0).tolist() == [10, 10, 10]  # dog: 11 listed, 1 unreadable
    assert counts[1:, [0, 2]].tolist() == [[2, 2], [2, 2]]  # 20 % each, per class
    images, labels = prepared.load_split(tmp_path / "a", "train")
    assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8 and len(labels) == counts[0].sum()

    # Splits are cut on the listing before decoding: the same file readable moves no other file.
    _save(root / "dog" / "broken.jpg", _photo((24, 24), seed=99), "JPEG")
    m3 = prepare.run(cfg, tmp_path / "c")
    assert m3["skipped"]["count"] == 0
    grew = [s for s in prepared.SPLITS if m3["splits"][s]["count"] == m1["splits"][s]["count"] + 1]
    assert len(grew) == 1
    for split in set(prepared.SPLITS) - set(grew):
        assert np.array_equal(
            prepared.load_split(tmp_path / "a", split)[0], prepared.load_split(tmp_path / "c", split)[0]
        )
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "fox"] and manifest["stored_resolution"] == 16


def test_source_splits_are_kept(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        make_folder(tmp_path / "src" / split, per_class=n, classes=("a", "b"))
    cfg = config.load("demo", [f"data.source={tmp_path / 'src'}", "data.stored_resolution=8"])
    m = prepare.run(cfg, tmp_path / "out")
    assert m["split_origin"] == "source"
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [8, 4, 4]


def test_too_many_bad_files_fail(tmp_path):
    root = make_folder(tmp_path / "src", per_class=2, classes=("a", "b"))
    for i in range(3):
        (root / "a" / f"bad{i}.png").write_text("text, not a png")
    cfg = config.load("demo", [f"data.source={root}", "data.stored_resolution=8"])
    with pytest.raises(DataError, match="unreadable"):
        prepare.run(cfg, tmp_path / "out")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": 3, "b": 0}, "hold no images"),
        ({"only": 3}, "single class"),
        ({}, "holds no files"),
    ],
)
def test_bad_class_layouts(tmp_path, layout, message):
    root = tmp_path / "src"
    root.mkdir()
    for c, n in layout.items():
        (root / c).mkdir()
        for i in range(n):
            _save(root / c / f"{i}.png", _photo(seed=i), "PNG")
        if n == 0:
            (root / c / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=message):
        sources.folder_source(str(root))


def test_no_readable_images(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "x.jpg").write_bytes(b"")
    cfg = config.load("demo", [f"data.source={tmp_path / 'src'}", "data.max_bad_fraction=1.0"])
    with pytest.raises(DataError, match="no readable images"):
        prepare.run(cfg, tmp_path / "out")


def test_missing_source_is_clear():
    with pytest.raises(DataError, match="/no/such/dir"):
        sources.check_source("/no/such/dir")


def test_corrupt_shard_is_detected(dataset_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    shard = next(copy.glob("val-*-images.npy"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum"):
        prepared.load_split(copy, "val")


def test_demo_dataset_has_fixed_splits(dataset_dir):
    m = prepared.read_manifest(dataset_dir)
    assert m["num_classes"] == 10 and m["split_origin"] == "source"
    assert [m["splits"][s]["count"] for s in ("train", "val", "test")] == [8000, 1000, 2000]
    assert all(c == 800 for c in m["splits"]["train"]["class_counts"])


def test_batch_indices_are_a_pure_function_of_the_step():
    n, b = 10, 4
    stream = np.concatenate([prepared.batch_indices(s, b, n, seed=3).numpy() for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert (prepared.batch_indices(3, b, n, seed=3) == prepared.batch_indices(3, b, n, seed=3)).all()
    assert not (prepared.batch_indices(0, b, n, seed=3) == prepared.batch_indices(0, b, n, seed=4)).all()


def test_unlabelled_sources_drop_labels(tmp_path):
    """distill.images / data.labels=none: the demo's and a named dataset's train images, or every image below
    a folder (any depth, no class folders), all labelled NO_LABEL; a folder without images is one line."""
    demo = sources.unlabelled_source("demo")
    images, labels = demo.arrays["all"]
    assert demo.classes == [] and len(images) == 8000 and (labels == prepared.NO_LABEL).all()
    food = tmp_path / "food-101"  # torchvision's Food101 layout, one train and one test image per class
    (food / "meta").mkdir(parents=True)
    names = tfds_splits.food101_labels()
    for split in ("train", "test"):
        (food / "meta" / f"{split}.json").write_text(json.dumps({c: [f"{c}/{split}1"] for c in names}))
    named = sources.unlabelled_source("food101", str(tmp_path), key="distill.images")
    train = sources.open_source("food101", str(tmp_path)).files["train"]  # TFDS train[:90%]
    assert named.files["all"] == [(f, prepared.NO_LABEL) for f, _ in train] and len(train) == 91
    (tmp_path / "pics" / "deep" / "er").mkdir(parents=True)
    for rel in ("top.png", "deep/er/low.JPG"):
        Image.new("RGB", (5, 7)).save(tmp_path / "pics" / rel, format="PNG" if rel.endswith("png") else "JPEG")
    (tmp_path / "pics" / "readme.txt").write_text("x")
    folder = sources.unlabelled_source(str(tmp_path / "pics"))
    assert sorted(f.rsplit("/", 1)[1] for f, _ in folder.files["all"]) == ["low.JPG", "top.png"]
    with pytest.raises(DataError, match=r"^distill\.images='.*empty' holds no images \(expected files ending in"):
        (tmp_path / "empty").mkdir()
        sources.unlabelled_source(str(tmp_path / "empty"), key="distill.images")
    with pytest.raises(DataError, match=r"^distill\.images='/nowhere' does not exist"):
        sources.unlabelled_source("/nowhere", key="distill.images")
