"""Batched augmentation on the training device (train and eval presets in one module).

Train (recipe.md §2.1): inception crop covering `area` of the image with aspect ratio uniform in
[3/4, 4/3] (TF `sample_distorted_bounding_box` semantics: up to 10 attempts, else the whole image),
bilinear resize without antialiasing, random horizontal flip, values to [-1, 1], mixup with one
a ~ Beta(1, 1) per batch, a = max(a, 1 - a), each image mixed with the batch rolled by one.
The crop is sampled once and resized separately per model resolution.

All random numbers come from a CPU generator (tiny tensors), so a batch is bit-identical whether the
images live on the host or on the GPU, and a step's augmentation is a function of (seed, step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from funmatch.runtime import to_device

ASPECT_RANGE = (3 / 4, 4 / 3)
ATTEMPTS = 10


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of one training step: resuming at `step` replays the same randomness."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def inception_boxes(
    n: int,
    height: int,
    width: int,
    area_range: tuple[float, float],
    generator: torch.Generator,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> torch.Tensor:
    """n boxes (x0, y0, x1, y1) in pixels with integer corners, as TF's sample_distorted_bounding_box.

    Per attempt: area fraction ~ U(area_range), aspect ratio w/h ~ U(aspect_range) (uniform, unlike
    torchvision's log-uniform); h = round(sqrt(A/r)), w = round(sqrt(A*r)); accepted when it fits and
    its rounded area is still in range. The first accepted attempt wins; none: the whole image.
    """
    area = height * width
    u = torch.rand(n, ATTEMPTS, 4, generator=generator, dtype=torch.float64)
    target = area * (area_range[0] + (area_range[1] - area_range[0]) * u[..., 0])
    ratio = aspect_range[0] + (aspect_range[1] - aspect_range[0]) * u[..., 1]
    h = torch.round(torch.sqrt(target / ratio))
    w = torch.round(torch.sqrt(target * ratio))
    covered = h * w / area
    ok = (
        (h >= 1)
        & (w >= 1)
        & (h <= height)
        & (w <= width)
        & (covered >= area_range[0] - 1e-9)
        & (covered <= area_range[1] + 1e-9)
    )
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)
    rows = torch.arange(n)
    h, w, uy, ux = h[rows, pick], w[rows, pick], u[rows, pick, 2], u[rows, pick, 3]
    y0 = torch.floor(uy * (height - h + 1)).clamp(max=height - h)
    x0 = torch.floor(ux * (width - w + 1)).clamp(max=width - w)
    none = first < 0
    h, w = torch.where(none, float(height), h), torch.where(none, float(width), w)
    y0, x0 = torch.where(none, 0.0, y0), torch.where(none, 0.0, x0)
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
) -> tuple[list[torch.Tensor] | None, torch.Tensor | list[torch.Tensor]]:
    """([teacher input per teacher resolution] or None for `fixed`, student input) for one batch.

    consistent / funmatch: one crop + flip, resized per model (funmatch adds shared mixup);
    independent: each model its own crop + flip; fixed: the student's random view only (the
    teacher's targets were precomputed on central crops). An ensemble whose teachers run at several
    resolutions (e.g. 384 and 224) gets the same crop at each.

    `shard=(rank, world)`: `images_u8` is the global batch, or (when `batch_size`, the global batch
    size, is given and larger) only its `shard_rows`; only this rank's contiguous slice is made, with
    exactly the randomness (and mixup neighbour) it has in the single-process batch.
    A list of student resolutions (several students) gives a list of student views of the same crop.
    """
    resolutions = [teacher_res] if isinstance(teacher_res, int) else list(teacher_res)
    n, height, width = batch_size or len(images_u8), *images_u8.shape[1:3]
    rows = shard_rows(n, setup, shard)
    boxes = inception_boxes(n, height, width, area_range, generator)
    flips = torch.rand(n, generator=generator) < 0.5
    t_boxes, t_flips = boxes, flips
    if setup == "independent":
        t_boxes = inception_boxes(n, height, width, area_range, generator)
        t_flips = torch.rand(n, generator=generator) < 0.5
    # Mixup pairs image i with i-1 of the global batch: the rows hold the neighbour of the slice's first image too.
    sharded_mixup = setup == "funmatch" and shard[1] > 1
    x = to_float_nchw(
        images_u8 if len(images_u8) < n or shard[1] == 1 else images_u8[to_device(rows, images_u8.device)]
    )
    if len(x) != len(rows):
        raise ValueError(
            f"distill_views got {len(x)} images; expected the global batch ({n}) or its {len(rows)} shard rows"
        )

    def view(b: torch.Tensor, f: torch.Tensor, res: int) -> torch.Tensor:
        return value_range(flip(crop_resize(x, b[rows], res), f[rows]))

    students = [view(boxes, flips, r) for r in ([student_res] if isinstance(student_res, int) else student_res)]
    teachers = None
    if setup != "fixed":
        teachers = [view(t_boxes, t_flips, r) for r in resolutions]
        if setup == "funmatch":
            a = mixup_coefficient(generator)
            mix = (lambda v: mixup(v, a)) if not sharded_mixup else (lambda v: a * v[1:] + (1 - a) * v[:-1])
            teachers, students = [mix(t) for t in teachers], [mix(v) for v in students]
    return teachers, (students[0] if isinstance(student_res, int) else students)


def eval_view(images_u8: torch.Tensor, res: int, crop_pct: float) -> torch.Tensor:
    """Resize (antialiased) to round(res / crop_pct), central crop res, values to [-1, 1]."""
    x = to_float_nchw(images_u8)
    big = max(res, int(round(res / crop_pct)))
    if x.shape[-2:] != (big, big):
        x = F.interpolate(x, size=(big, big), mode="bilinear", antialias=True, align_corners=False)
    top = (big - res) // 2
    return value_range(x[..., top : top + res, top : top + res].clamp(0, 255))


def finetune_view(images_u8: torch.Tensor, res: int, crop_pct: float, generator: torch.Generator) -> torch.Tensor:
    """BiT-HyperRule training view: square resize to res/crop_pct, random res crop, flip, [-1, 1]."""
    x = to_float_nchw(images_u8)
    big = max(res, int(round(res / crop_pct)))
    if x.shape[-2:] != (big, big):
        x = F.interpolate(x, size=(big, big), mode="bilinear", antialias=True, align_corners=False)
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
