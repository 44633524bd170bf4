"""Batched augmentation on the training device (train and eval presets in one module).

Train (recipe.md §2.1): inception crop covering `area` of the image, sampled like TF's
`sample_distorted_bounding_box` kernel (see `inception_boxes`),
bilinear resize without antialiasing, random horizontal flip, values to [-1, 1], mixup with one
a ~ Beta(1, 1) per batch, a = max(a, 1 - a), each image mixed with the batch rolled by one.
The crop is sampled once and resized separately per model resolution.

Every view is taken from each image's frame, the (h, w) region at the top-left of its stored letterboxed
canvas (`frames`, N×2; None: the whole canvas), as big_vision takes it from the decoded original image;
with whole-canvas frames the results are bit for bit those of frames=None.

All random numbers come from a CPU generator (tiny tensors), so a batch is bit-identical whether the
images live on the host or on the GPU, and a step's augmentation is a function of (seed, step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from funmatch.config import canonical_setup
from funmatch.runtime import to_device

# tf.image.sample_distorted_bounding_box's op defaults, which big_vision's inception_crop leaves in place
# (it passes only area_range and min_object_covered=0): aspect ratio w/h in [0.75, 1.33], 100 attempts.
ASPECT_RANGE = (0.75, 1.33)
ATTEMPTS = 100


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one training step: resuming at `step` replays the same randomness."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


Side = int | torch.Tensor  # a frame side: one for every image, or per image (a tensor of shape N)


def _per_image(side: Side, n: int) -> torch.Tensor:
    """A frame side as float64 of shape N (an int for every image, or per-image values)."""
    return torch.as_tensor(side, dtype=torch.float64).expand(n)


def inception_boxes(
    n: int,
    height: Side,
    width: Side,
    area_range: tuple[float, float],
    generator: torch.Generator,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> torch.Tensor:
    """n boxes (x0, y0, x1, y1) in pixels with integer corners, one per image of a height×width frame
    (ints: every image's; tensors of shape N: each image's own frame at the canvas's top-left).

    The sampling of TF's SampleDistortedBoundingBoxV2 kernel (GenerateRandomCrop) with the whole image as
    the only object and min_object_covered=0, in float32 like the kernel. Per attempt: aspect ratio
    r = w/h ~ U(aspect_range); h_min = round(sqrt(min_area / r)), h_max = round(sqrt(max_area / r)),
    h_max lowered until round(h_max·r) <= width, then capped at height; h ~ uniform integer in
    [h_min, h_max] (h = h_max when h_min >= h_max); w = round(h·r) (round half to even); if w·h < min_area
    h += 1, then if w·h > max_area h -= 1 (w recomputed each time); accepted when the area is in range
    and the box fits. The first accepted of `ATTEMPTS` attempts wins, none: the whole image. Offsets
    y0 ~ uniform integer in [0, height - h - 1] (0 when h = height), x0 likewise: as in the kernel, a
    smaller crop never touches the bottom or right edge.
    """
    f32 = torch.float32
    height, width = _per_image(height, n), _per_image(width, n)  # float64: exact for any pixel count
    h32, w32 = height.to(f32)[:, None], width.to(f32)[:, None]
    min_area = torch.tensor(area_range[0], dtype=f32) * w32 * h32
    max_area = torch.tensor(area_range[1], dtype=f32) * w32 * h32
    lo, hi = torch.tensor(aspect_range[0], dtype=f32), torch.tensor(aspect_range[1], dtype=f32)
    u = torch.rand(n, ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    ratio = u[..., 0].to(f32) * (hi - lo) + lo
    h_min = torch.round(torch.sqrt(min_area / ratio))
    h_max = torch.round(torch.sqrt(max_area / ratio))
    # the largest height whose rounded width still fits: truncation of (width + 0.5 - 1e-7) / r in float64
    fit = torch.floor((width[:, None] + 0.5 - float(torch.tensor(1e-7, dtype=f32))) / ratio.double()).to(f32)
    fit = torch.where(torch.round(fit * ratio) > w32, fit - 1, fit)
    h_max = torch.minimum(torch.where(torch.round(h_max * ratio) > w32, fit, h_max), h32)
    span = (h_max - h_min).clamp(min=0)
    h = torch.minimum(h_min, h_max) + torch.floor(u[..., 1] * (span.double() + 1)).clamp(max=span.double()).to(f32)
    w = torch.round(h * ratio)
    small = w * h < min_area
    h = torch.where(small, h + 1, h)
    w = torch.round(h * ratio)
    large = w * h > max_area
    h = torch.where(large, h - 1, h)
    w = torch.round(h * ratio)
    ok = (w * h >= min_area) & (w * h <= max_area) & (w <= w32) & (h <= h32) & (w > 0) & (h > 0)
    first = torch.where(ok.any(1), ok.to(torch.uint8).argmax(1), torch.full((n,), -1))
    rows, pick = torch.arange(n), first.clamp(min=0)
    none = first < 0
    h = torch.where(none, height, h[rows, pick].double())
    w = torch.where(none, width, w[rows, pick].double())
    off = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    y0 = torch.floor(off[:, 0] * (height - h)).clamp(max=(height - h - 1).clamp(min=0))
    x0 = torch.floor(off[:, 1] * (width - w)).clamp(max=(width - w - 1).clamp(min=0))
    return torch.stack([x0, y0, x0 + w, y0 + h], 1).float()


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops each NCHW float image to its box and resizes it to size×size, bilinear, no antialias
    (half-pixel centres, one sample per output pixel: roi_align with sampling_ratio=1, aligned)."""
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(
        images,
        to_device(rois.to(images.dtype), images.device),
        (size, size),
        spatial_scale=1.0,
        sampling_ratio=1,
        aligned=True,
    )


def to_float_nchw(images_u8: torch.Tensor) -> torch.Tensor:
    """N×H×W×3 uint8 → N×3×H×W float32 in [0, 255]."""
    return images_u8.permute(0, 3, 1, 2).float()


def value_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] → [-1, 1] (mean 0.5, std 0.5 on [0, 1])."""
    return x / 127.5 - 1.0


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(to_device(mask, x.device)[:, None, None, None], x.flip(-1), x)


def mixup_coefficient(generator: torch.Generator) -> float:
    """a ~ Beta(1, 1), i.e. uniform, folded so that a >= 0.5 (big_vision get_mixup, p=1.0)."""
    a = float(torch.rand((), generator=generator, dtype=torch.float64))
    return max(a, 1.0 - a)


def mixup(x: torch.Tensor, a: float) -> torch.Tensor:
    """a·x + (1-a)·roll(x, 1): each image mixed with its neighbour in the batch."""
    return a * x + (1.0 - a) * x.roll(1, dims=0)


def mild_crop_boxes(
    n: int, height: Side, width: Side, res: int, crop_pct: float, generator: torch.Generator
) -> torch.Tensor:
    """n "mild random crops" (x0, y0, x1, y1) in the image's pixels: big_vision's `resize(H)|random_crop(L)`
    with L = res, H = round(res / crop_pct) (`big_vision/configs/transfer.py` crop='resize_crop', BiT-HyperRule;
    `big_vision/pp/ops_image.py` get_resize (bilinear, no antialias) and get_random_crop (tf.image.random_crop:
    an integer offset uniform in [0, H - L])). The box is that L×L window mapped back onto the original
    image, so `crop_resize` to `res` samples exactly the pixels resize-then-crop would, and another model
    can see the same window at its own resolution. It covers crop_pct² of the image (0.64 at 0.8).
    height, width: every image's frame (ints) or each image's (tensors of shape N)."""
    big = max(res, int(round(res / crop_pct)))
    off = torch.floor(torch.rand(n, 2, generator=generator) * (big - res + 1)).clamp(max=big - res)
    sx, sy = _per_image(width, n) / big, _per_image(height, n) / big  # float64, as Python's int / int
    x0, y0 = off[:, 0] * sx.float(), off[:, 1] * sy.float()
    return torch.stack([x0, y0, x0 + (res * sx).float(), y0 + (res * sy).float()], 1)


def full_boxes(n: int, height: Side, width: Side) -> torch.Tensor:
    """n boxes covering each image's whole frame: `crop_resize` with them is a plain resize (fix/rs)."""
    zero = torch.zeros(n)
    return torch.stack([zero, zero, _per_image(width, n).float(), _per_image(height, n).float()], 1)


def frame_sides(images_u8: torch.Tensor, frames: torch.Tensor | None) -> tuple[Side, Side]:
    """(heights, widths) of the images' frames: the canvas's sides (ints) when `frames` is None, else
    the N×2 (h, w) `frames` as two CPU tensors."""
    if frames is None:
        return int(images_u8.shape[1]), int(images_u8.shape[2])
    frames = frames.cpu()
    return frames[:, 0], frames[:, 1]


def fill_letterbox(images_u8: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """N×H×W×C uint8 canvases with each frame's last row and column repeated over the letterbox (the
    frame clamped to its edge, as TF's resize of a decoded crop samples), so that `crop_resize` of a
    box inside the frame never blends in the letterbox's zeros (a sample up to half a pixel from the
    frame's edge reaches past it). The canvases unchanged when `frames` is None or all whole."""
    if frames is None:
        return images_u8
    n, height, width, channels = images_u8.shape
    frames = frames.cpu().long()
    if bool((frames[:, 0] == height).all() and (frames[:, 1] == width).all()):
        return images_u8
    rows = to_device(torch.minimum(torch.arange(height), frames[:, :1] - 1), images_u8.device)
    cols = to_device(torch.minimum(torch.arange(width), frames[:, 1:] - 1), images_u8.device)
    x = images_u8.gather(1, rows[:, :, None, None].expand(n, height, width, channels))
    return x.gather(2, cols[:, None, :, None].expand(n, height, width, channels))


def resized_view(images_u8: torch.Tensor, res: int, frames: torch.Tensor | None = None) -> torch.Tensor:
    """fix/rs view: each image's whole frame resized to res×res (bilinear, no antialias, no flip), values to
    [-1, 1]: big_vision's `resize(res)` (`big_vision/pp/ops_image.py` get_resize)."""
    boxes = full_boxes(len(images_u8), *frame_sides(images_u8, frames))
    return value_range(crop_resize(to_float_nchw(fill_letterbox(images_u8, frames)), boxes, res))


def crop_kind(setup: str) -> str:
    """The crop a variant gives the student: 'rs' (resize, no crop), 'rc' (mild random crop) or 'ic'
    (inception crop)."""
    s = canonical_setup(setup)
    if s == "fix/rs":
        return "rs"
    return "rc" if s in ("fix/cc", "ind/rc", "same/rc") else "ic"


def shard_rows(batch_size: int, setup: str, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The rows of the global batch whose images rank `shard[0]` of `shard[1]` uses: its contiguous
    slice, preceded (funmatch under DDP) by the mixup neighbour of the slice's first image."""
    rank, world = shard
    local = torch.arange(rank * batch_size // world, (rank + 1) * batch_size // world)
    return torch.cat([(local[:1] - 1) % batch_size, local]) if setup == "funmatch" and world > 1 else local


@overload
def distill_views(
    images_u8: torch.Tensor,
    setup: str,
    teacher_res: int | Sequence[int],
    student_res: int,
    area_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = ...,
    batch_size: int | None = ...,
    crop_pct: float = ...,
    frames: torch.Tensor | None = ...,
) -> tuple[list[torch.Tensor] | None, torch.Tensor]: ...


@overload
def distill_views(
    images_u8: torch.Tensor,
    setup: str,
    teacher_res: int | Sequence[int],
    student_res: Sequence[int],
    area_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = ...,
    batch_size: int | None = ...,
    crop_pct: float = ...,
    frames: torch.Tensor | None = ...,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]: ...


def distill_views(
    images_u8: torch.Tensor,
    setup: str,
    teacher_res: int | Sequence[int],
    student_res: int | Sequence[int],
    area_range: tuple[float, float],
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
    batch_size: int | None = None,
    crop_pct: float = 0.8,
    frames: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | list[torch.Tensor]]:
    """([teacher input per teacher resolution] or None for a fix/* variant, student input) for one batch.

    The student's crop (`crop_kind`): fix/rs the resized image (no crop, no flip); fix/cc, ind/rc, same/rc
    a mild random crop (`mild_crop_boxes`, on the first student resolution's grid, `crop_pct`) + flip;
    fix/ic_ens, ind/ic, same/ic, funmatch an inception crop (`area_range`) + flip. The teacher: fix/* none
    (its targets are precomputed); ind/* its own crop of the same kind + flip (mild: on its first
    resolution's grid); same/* and funmatch the student's crop and flip, resized per model; funmatch adds
    shared mixup. The aliases fixed / independent / consistent are fix/cc / ind/ic / same/ic. An ensemble
    whose teachers run at several resolutions (e.g. 384 and 224) gets the same crop at each.

    `shard=(rank, world)`: `images_u8` is the global batch, or (when `batch_size`, the global batch
    size, is given and larger) only its `shard_rows`; only this rank's contiguous slice is made, with
    exactly the randomness (and mixup neighbour) it has in the single-process batch.
    A list of student resolutions (several students) gives a list of student views of the same crop.
    `frames`: the N×2 (h, w) frames of the rows of `images_u8` (None: every image fills the canvas); each
    box is drawn inside its image's frame, with the same random numbers as for a full canvas, and
    sampled from the frame alone (`fill_letterbox`).
    """
    variant, kind = canonical_setup(setup), crop_kind(setup)
    resolutions = [teacher_res] if isinstance(teacher_res, int) else list(teacher_res)
    s_resolutions = [student_res] if isinstance(student_res, int) else list(student_res)
    n = batch_size or len(images_u8)
    rows = shard_rows(n, setup, shard)
    height, width = frame_sides(images_u8, frames)
    images_u8 = fill_letterbox(images_u8, frames)
    if frames is not None and len(frames) < n:  # only this rank's rows: the others' boxes are never used
        full = torch.tensor([images_u8.shape[1:3]], dtype=frames.dtype).repeat(n, 1)
        full[rows] = frames.cpu()
        height, width = full[:, 0], full[:, 1]

    def draw(res: int) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "rs":
            return full_boxes(n, height, width), torch.zeros(n, dtype=torch.bool)
        boxes = (
            mild_crop_boxes(n, height, width, res, crop_pct, generator)
            if kind == "rc"
            else inception_boxes(n, height, width, area_range, generator)
        )
        return boxes, torch.rand(n, generator=generator) < 0.5

    boxes, flips = draw(s_resolutions[0])
    t_boxes, t_flips = draw(resolutions[0]) if variant.startswith("ind/") else (boxes, flips)
    # Mixup pairs image i with i-1 of the global batch: the rows hold the neighbour of the slice's first image too.
    sharded_mixup = variant == "funmatch" and shard[1] > 1
    x = to_float_nchw(
        images_u8 if len(images_u8) < n or shard[1] == 1 else images_u8[to_device(rows, images_u8.device)]
    )
    if len(x) != len(rows):
        raise ValueError(
            f"distill_views got {len(x)} images; expected the global batch ({n}) or its {len(rows)} shard rows"
        )

    def view(b: torch.Tensor, f: torch.Tensor, res: int) -> torch.Tensor:
        return value_range(flip(crop_resize(x, b[rows], res), f[rows]))

    students = [view(boxes, flips, r) for r in s_resolutions]
    teachers = None
    if not variant.startswith("fix/"):
        teachers = [view(t_boxes, t_flips, r) for r in resolutions]
        if variant == "funmatch":
            a = mixup_coefficient(generator)
            mix = (lambda v: mixup(v, a)) if not sharded_mixup else (lambda v: a * v[1:] + (1 - a) * v[:-1])
            teachers, students = [mix(t) for t in teachers], [mix(v) for v in students]
    return teachers, (students[0] if isinstance(student_res, int) else students)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW float resized to `size` (bilinear, antialiased); unchanged when it has that size."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def per_frame(
    x: torch.Tensor, frames: torch.Tensor | None, side: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`fn` (an NCHW → N×C×side×side map) applied to each image's frame region, the images of one frame
    size at a time; with `frames` None to the whole canvases at once."""
    if frames is None:
        return fn(x)
    frames = frames.cpu()
    out = x.new_empty((len(x), x.shape[1], side, side))
    for h, w in torch.unique(frames, dim=0).tolist():
        rows = to_device(((frames[:, 0] == h) & (frames[:, 1] == w)).nonzero()[:, 0], x.device)
        out[rows] = fn(x[rows, :, :h, :w])
    return out


def eval_view(images_u8: torch.Tensor, res: int, crop_pct: float, frames: torch.Tensor | None = None) -> torch.Tensor:
    """big_vision's `resize_small(big)|central_crop(res)`, big = round(res / crop_pct), on each image's frame
    (`frames` N×2 (h, w); None: the whole canvas): the frame resized (antialiased) so that its short side is
    big and its long side round(long·big/short), then its central res×res window (offsets (H - res) // 2),
    values to [-1, 1]."""
    big = max(res, int(round(res / crop_pct)))

    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        short = min(h, w)
        x = _resize(x, (big if h == short else round(h * big / short), big if w == short else round(w * big / short)))
        top, left = (x.shape[-2] - res) // 2, (x.shape[-1] - res) // 2
        return x[..., top : top + res, left : left + res]

    return value_range(per_frame(to_float_nchw(images_u8), frames, res, view).clamp(0, 255))


def finetune_view(
    images_u8: torch.Tensor,
    res: int,
    crop_pct: float,
    generator: torch.Generator,
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """BiT-HyperRule training view: each image's frame (`frames` N×2 (h, w); None: the whole canvas)
    resized (antialiased) to a res/crop_pct square, random res crop, flip, [-1, 1]."""
    big = max(res, int(round(res / crop_pct)))
    x = per_frame(to_float_nchw(images_u8), frames, big, lambda f: _resize(f, (big, big)))
    n = len(x)
    off = torch.floor(torch.rand(n, 2, generator=generator) * (big - res + 1)).clamp(max=big - res)
    boxes = torch.cat([off[:, :1], off[:, 1:], off[:, :1] + res, off[:, 1:] + res], 1)
    flips = torch.rand(n, generator=generator) < 0.5
    return value_range(flip(crop_resize(x, boxes, res), flips).clamp(0, 255))


def batch_mixup_lambda(alpha: float, generator: torch.Generator) -> float:
    """One λ ~ Beta(α, α) per batch (BiT-HyperRule fine-tuning mixup); α = 0: no mixup."""
    if alpha <= 0:
        return 1.0
    g = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=generator)
    total = float(g.sum())
    return float(g[0]) / total if total > 0 else 1.0  # both gammas can underflow for tiny alpha
