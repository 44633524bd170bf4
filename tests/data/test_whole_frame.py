"""Whole-frame storage: each image kept whole (aspect ratio, long side = the canvas) and letterboxed with its
frame recorded; training crops and the eval view taken from each image's own frame; /1 artifacts still read."""

import json
import shutil
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from funmatch import config
from funmatch.data import loader, prepared, sources
from funmatch.errors import DataError
from funmatch.recipe import augment
from funmatch.stages import prepare

AREA = (0.05, 1.0)
# (w, h) of the source images: landscape 2:1, portrait, square, smaller than the canvas, odd sizes
SIZES = [(40, 20), (20, 40), (30, 30), (10, 5), (33, 17), (17, 33)]
SIDE = 16  # stored canvas


def _gradient(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth h×w×3 image with values in [40, 250] (never the letterbox's 0)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(0, 1, 3)
    out = 40 + 210 * (0.5 + 0.5 * np.sin(x[..., None] / (w / 3) + y[..., None] / (h / 2) + base * 6))
    return out.astype(np.uint8)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "src"
    originals = {}
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            arr = _gradient(w, h, seed=i + 10 * (c == "b"))
            Image.fromarray(arr).save(root / c / f"{i}.png")
            originals[f"{c}/{i}.png"] = arr
    return root, originals


def _prepared(tmp_path, root, encoding: str):
    cfg = config.load(
        "demo",
        [
            f"data.source={root}",
            f"data.stored_resolution={SIDE}",
            f"data.encoding={encoding}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "data.shard_size=3",
        ],
    )
    prepare.run(cfg, tmp_path / encoding)
    return tmp_path / encoding


def _expected_frame(w: int, h: int) -> tuple[int, int]:
    long = max(w, h)
    if long <= SIDE:  # never upscaled
        return h, w
    return max(1, round(h * SIDE / long)), max(1, round(w * SIDE / long))


# ---------------------------------------------------------------- storage


def test_storage_keeps_the_whole_image_letterboxed_with_its_frame(tmp_path, mixed_folder):
    root, originals = mixed_folder
    out = _prepared(tmp_path, root, "raw")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "funmatch-dataset/2"
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for split in prepared.SPLITS:
        x, _ = prepared.load_split(out, split)
        f = prepared.load_frames(out, split)
        assert f.dtype == np.int32 and f.shape == (len(x), 2)
        assert np.array_equal(prepared.ShardedImages(out, split).frames(np.arange(len(x))), f)
        for shard in manifest["splits"][split]["shards"]:
            assert shard["frames"].endswith("-frames.npy") and len(shard["frames_sha256"]) == 64
        parts.append((x, f))
    images, frames = (np.concatenate(p) for p in zip(*parts, strict=True))
    want = sorted(_expected_frame(w, h) for w, h in SIZES for _ in range(2))
    assert sorted(map(tuple, frames.tolist())) == want  # every image's frame, aspect kept
    assert sorted(frames.max(1).tolist()) == sorted(min(SIDE, max(w, h)) for w, h in SIZES for _ in range(2))
    small = [(h, w) for w, h in SIZES if max(w, h) <= SIDE]
    assert small and all(f in map(tuple, frames.tolist()) for f in small)  # a smaller image is not upscaled
    for im, (h, w) in zip(images, frames, strict=True):
        assert im[:h, :w].min() >= 40  # the image fills its frame
        assert (im[h:] == 0).all() and (im[:, w:] == 0).all()  # the letterbox is zero
    # the frame holds exactly the long-side fit of the original (PIL, antialiased)
    stored = {tuple(im[:h, :w].ravel()) for im, (h, w) in zip(images, frames, strict=True)}
    for arr in originals.values():
        fit = np.asarray(sources.fit_long_side(Image.fromarray(arr), SIDE))
        assert tuple(fit.ravel()) in stored


def test_jpeg_shards_hold_the_same_letterboxed_canvas(tmp_path, mixed_folder):
    raw, jpeg = (_prepared(tmp_path, mixed_folder[0], e) for e in ("raw", "jpeg"))
    for split in prepared.SPLITS:
        assert np.array_equal(prepared.load_frames(raw, split), prepared.load_frames(jpeg, split))
        a, b = (prepared.load_split(d, split)[0].astype(int) for d in (raw, jpeg))
        # quality 95 (4:2:0): a few grey levels; more next to a frame's edge, where the letterbox's black meets
        # the image inside one 8x8 block (these 16 px canvases are mostly edge)
        assert np.abs(a - b).mean() < 6


def test_frames_are_checksummed(tmp_path, mixed_folder):
    out = _prepared(tmp_path, mixed_folder[0], "raw")
    shard = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    np.save(out / shard["frames"], np.full((shard["count"], 2), SIDE, np.int32))
    with pytest.raises(DataError, match="checksum mismatch"):
        prepared.load_frames(out, "train")


def test_square_images_are_stored_as_before():
    """A square image comes out as the former short-side fit + centre crop did (ImageOps.fit)."""
    from PIL import ImageOps

    img = Image.fromarray(_gradient(37, 37, seed=3))
    old = np.asarray(ImageOps.fit(img, (SIDE, SIDE), method=Image.Resampling.BILINEAR))
    canvas, frames = sources.resize_array(np.asarray(img)[None], SIDE)
    assert np.array_equal(canvas[0], old) and frames.tolist() == [[SIDE, SIDE]]


def test_a_format_1_artifact_still_loads(tmp_path, mixed_folder):
    out = _prepared(tmp_path, mixed_folder[0], "raw")
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "funmatch-dataset/1"
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            (old / shard.pop("frames")).unlink()
            del shard["frames_sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    images, labels = prepared.load_split(old, "train")
    frames = prepared.load_frames(old, "train")
    assert np.array_equal(frames, np.full((len(images), 2), SIDE, np.int32))  # /1: every frame is the canvas
    assert np.array_equal(prepared.ShardedImages(old, "train").frames(np.arange(len(images))), frames)
    batches = loader.Batches(old, torch.device("cpu"), 1.0, 4, seed=0, rows=torch.arange(4))
    (x, f), *_ = batches.iterate(0, 1)
    assert x.shape == (4, SIDE, SIDE, 3) and (f == SIDE).all()


# ---------------------------------------------------------------- loader


def test_loader_gives_each_batch_its_frames_on_every_path(tmp_path, mixed_folder):
    out = _prepared(tmp_path, mixed_folder[0], "jpeg")
    rows = torch.arange(1, 4)
    make = lambda **kw: loader.Batches(out, torch.device("cpu"), batch_size=4, seed=5, rows=rows, **kw)  # noqa: E731
    resident, streamed = make(resident_max_gb=1.0), make(resident_max_gb=0.0, workers=1)
    assert resident.resident is not None and streamed.resident is None
    frames = torch.from_numpy(prepared.load_frames(out, "train"))
    got = list(streamed.iterate(2, 5))
    for step, ((x, f), (sx, sf)) in enumerate(zip(resident.iterate(2, 5), got, strict=True), start=2):
        idx = prepared.batch_indices(step, 4, resident.n, 5)[rows]
        assert torch.equal(f, frames[idx]) and torch.equal(sf, f) and torch.equal(sx, x)


# ---------------------------------------------------------------- crops from the whole frame


def test_inception_crops_reach_the_outer_quarters_of_a_2to1_frame_and_never_leave_it():
    n, canvas = 4000, 64
    h, w = torch.full((n,), 32), torch.full((n,), 64)  # 2:1 landscape at the canvas's top-left
    boxes = augment.inception_boxes(n, h, w, AREA, torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 32).all()  # inside the frame
    seen = torch.zeros(64, dtype=torch.bool)
    for a, b in zip(x0.long().tolist(), x1.long().tolist(), strict=True):
        seen[a:b] = True
    # the outer quarters are seen (up to the last column, which TF's kernel leaves to boxes as wide as the frame:
    # its offset is uniform in [0, width - w - 1], and no 3:4–4:3 box of a 64×32 frame is 64 wide)
    assert seen[: w[0] // 4].all() and seen[3 * w[0] // 4 : -1].all()
    # the former square centre crop of this image (its central 32×32) could never show them
    square = augment.inception_boxes(n, canvas // 2, canvas // 2, AREA, torch.Generator().manual_seed(0))
    assert square[:, 2].max() <= 32


def test_views_never_see_the_letterbox():
    """Training, fixed-teacher and eval views of letterboxed images sample only inside each frame; without
    the frames they do see the zero letterbox (so the check can fail)."""
    frames = torch.tensor([[16, 32], [32, 16], [32, 32], [20, 7]] * 4, dtype=torch.int32)
    images = torch.zeros(len(frames), 32, 32, 3, dtype=torch.uint8)
    for im, (h, w) in zip(images, frames.tolist(), strict=True):
        im[:h, :w] = 200
    floor = 200 / 127.5 - 1 - 1e-4
    for setup in ("same/ic", "same/rc", "fix/rs"):
        _, s = augment.distill_views(images, setup, 24, 24, AREA, augment.step_generator(0, 1), frames=frames)
        _, bare = augment.distill_views(images, setup, 24, 24, AREA, augment.step_generator(0, 1))
        assert s.min() >= floor and bare.min() < floor, setup
    for view in (
        lambda f: augment.eval_view(images, 16, 0.8, f),
        lambda f: augment.finetune_view(images, 16, 0.8, torch.Generator().manual_seed(2), f),
        lambda f: augment.resized_view(images, 16, f),
    ):
        assert view(frames).min() >= floor and view(None).min() < floor


@pytest.mark.parametrize("setup", ["funmatch", "same/rc", "ind/ic", "fix/rs"])
def test_letterboxed_views_are_the_views_of_the_original_images(setup):
    """Views of 2:1 images letterboxed on a square canvas (with their frames) are the views of the same
    images on their own 2:1 canvas (float rounding aside: the frame's edge is blended with its copy)."""
    originals = torch.from_numpy(np.stack([_gradient(40, 20, seed=i) for i in range(6)]))
    canvas = torch.zeros(6, 40, 40, 3, dtype=torch.uint8)
    canvas[:, :20] = originals
    frames = torch.tensor([[20, 40]] * 6, dtype=torch.int32)
    boxed = augment.distill_views(canvas, setup, 24, 16, AREA, augment.step_generator(2, 5), frames=frames)
    alone = augment.distill_views(originals, setup, 24, 16, AREA, augment.step_generator(2, 5))
    assert torch.allclose(boxed[1], alone[1], atol=1e-5)
    assert (boxed[0] is None) == (alone[0] is None)
    assert boxed[0] is None or alone[0] is None or torch.allclose(boxed[0][0], alone[0][0], atol=1e-5)


def test_fixed_teacher_ensemble_crops_stay_in_each_frame():
    """fix/ic_ens's K inception crops per image (distill.ensemble_targets) sample each image's frame only."""
    from funmatch.stages import distill

    class Probe:  # stands in for the teacher: records what its views see, answers with their means
        def __init__(self) -> None:
            self.views_of, self.minima = [16], list[float]()

        def batched(self, images_u8, view, batch_size, device, amp) -> torch.Tensor:
            out = []
            for start in range(0, len(images_u8), batch_size):
                v = view(images_u8[start : start + batch_size], 16, slice(start, start + batch_size))
                self.minima.append(float(v.min()))
                out.append(v.mean((1, 2, 3))[:, None].repeat(1, 3))
            return torch.cat(out)

    frames = torch.tensor([[8, 32], [32, 11], [32, 32], [20, 7]] * 3, dtype=torch.int32)
    images = torch.zeros(len(frames), 32, 32, 3, dtype=torch.uint8)
    for im, (h, w) in zip(images, frames.tolist(), strict=True):
        im[:h, :w] = 200
    cfg = config.load("demo-tiny", ["distill.ensemble_crops=8", "eval.batch_size=5"])
    floor = 200 / 127.5 - 1 - 1e-4
    for f, inside in ((frames, True), (None, False)):
        probe = Probe()
        g = torch.Generator().manual_seed(0)
        targets = distill.ensemble_targets(cast(Any, probe), images, cfg, g, torch.device("cpu"), None, f)
        assert targets.shape == (len(images), 3) and (min(probe.minima) >= floor) == inside


def test_per_image_boxes_are_the_sampler_of_each_frame():
    """Boxes drawn for mixed frames equal, row for row, the boxes drawn with that frame for every image
    (whose distribution tests/recipe/test_tf_sampler.py pins to TF's kernel)."""
    n = 600
    shapes = torch.tensor([(48, 64), (64, 48), (64, 64), (31, 64), (64, 9)])
    frames = shapes[torch.arange(n) % len(shapes)]
    mixed = augment.inception_boxes(n, frames[:, 0], frames[:, 1], AREA, torch.Generator().manual_seed(4))
    mild = augment.mild_crop_boxes(n, frames[:, 0], frames[:, 1], 24, 0.8, torch.Generator().manual_seed(4))
    for h, w in shapes.tolist():
        rows = ((frames[:, 0] == h) & (frames[:, 1] == w)).nonzero()[:, 0]
        alone = augment.inception_boxes(n, h, w, AREA, torch.Generator().manual_seed(4))
        assert torch.equal(mixed[rows], alone[rows])
        alone = augment.mild_crop_boxes(n, h, w, 24, 0.8, torch.Generator().manual_seed(4))
        assert torch.equal(mild[rows], alone[rows])
    assert torch.equal(
        augment.full_boxes(n, frames[:, 0], frames[:, 1]),
        torch.stack([torch.zeros(n), torch.zeros(n), frames[:, 1].float(), frames[:, 0].float()], 1),
    )


@pytest.mark.parametrize("setup", ["funmatch", "ind/rc", "fix/ic_ens"])
def test_shard_rows_with_frames_equal_the_global_batch(setup):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=g)
    frames = torch.tensor([[32, 21], [17, 32], [32, 32]] * 4, dtype=torch.int32)
    for shard in ((0, 3), (2, 3)):
        rows = augment.shard_rows(12, setup, shard)
        full_t, full_s = augment.distill_views(
            images, setup, 24, 16, AREA, augment.step_generator(1, 3), shard, 12, frames=frames
        )
        t, s = augment.distill_views(
            images[rows], setup, 24, 16, AREA, augment.step_generator(1, 3), shard, 12, frames=frames[rows]
        )
        assert torch.equal(s, full_s) and (t is None) == (full_t is None)
        assert t is None or full_t is None or all(torch.equal(a, b) for a, b in zip(t, full_t, strict=True))


# ---------------------------------------------------------------- square data: bit for bit as before


@pytest.mark.parametrize("setup", ["funmatch", "same/rc", "ind/ic", "fix/rs"])
def test_full_canvas_frames_change_nothing(setup):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 28, 28, 3), dtype=torch.uint8, generator=g)
    full = torch.full((8, 2), 28, dtype=torch.int32)
    a = augment.distill_views(images, setup, (32, 24), [20, 16], AREA, augment.step_generator(3, 4))
    b = augment.distill_views(images, setup, (32, 24), [20, 16], AREA, augment.step_generator(3, 4), frames=full)
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    assert (a[0] is None) == (b[0] is None)
    assert all(torch.equal(x, y) for x, y in zip(a[0] or [], b[0] or [], strict=True))
    for res, pct in ((24, 0.8), (28, 1.0), (16, 0.875)):
        assert torch.equal(augment.eval_view(images, res, pct), augment.eval_view(images, res, pct, full))
        ft = [augment.finetune_view(images, res, pct, torch.Generator().manual_seed(5), f) for f in (None, full)]
        assert torch.equal(*ft)
    assert torch.equal(
        augment.inception_boxes(500, 28, 28, AREA, torch.Generator().manual_seed(9)),
        augment.inception_boxes(
            500, full[:1, 0].expand(500), full[:1, 1].expand(500), AREA, torch.Generator().manual_seed(9)
        ),
    )


# ---------------------------------------------------------------- the eval view of a non-square image


@pytest.mark.parametrize("w, h", [(60, 40), (40, 60), (60, 23)])
def test_eval_view_is_resize_small_then_central_crop_of_the_whole_image(w, h):
    """Stored at canvas 60 (its long side, so the frame holds the original pixels), the eval view equals
    big_vision's resize_small(30)|central_crop(24) of the original image: exactly torch's antialiased
    resize of the original then the central crop, and PIL's (antialiased bilinear, rounded to uint8) within
    one grey level (1/127.5 in [-1, 1]) plus float noise."""
    res, pct = 24, 0.8
    big = 30
    original = _gradient(w, h, seed=7)
    canvas, frames = sources.letterbox([original], 60)
    assert frames.tolist() == [[h, w]]
    view = augment.eval_view(torch.from_numpy(canvas), res, pct, torch.from_numpy(frames))[0]

    short = min(w, h)
    size = (round(h * big / short), round(w * big / short))  # (H, W), short side = big
    top, left = (size[0] - res) // 2, (size[1] - res) // 2
    x = torch.from_numpy(original).permute(2, 0, 1)[None].float()
    ref = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    ref = ref[:, top : top + res, left : left + res].clamp(0, 255) / 127.5 - 1
    assert torch.equal(view, ref)

    resized = np.asarray(Image.fromarray(original).resize(size[::-1], Image.Resampling.BILINEAR))
    pil = torch.from_numpy(resized[top : top + res, left : left + res].astype(np.float32)).permute(2, 0, 1)
    assert (view - (pil / 127.5 - 1)).abs().max() <= 1 / 127.5 + 1e-5
    # the square crop of the canvas (the frames ignored) is another picture
    assert (augment.eval_view(torch.from_numpy(canvas), res, pct)[0] - view).abs().max() > 0.5
