"""`funmatch bench distill`: the project's real distill loop against plain-PyTorch baselines, one process.

The loop is `funmatch.stages.distill.run` itself — prepared dataset artifact (uint8 shards resident on
the device; or, with `--set data.encoding=jpeg --set runtime.resident_max_gb=0`, JPEG shards streamed
through the decode workers) → batched augmentation → frozen teacher → student → clipped Adam — on a
synthetic dataset artifact with the preset's shapes. The baselines are those of
`shared/tools/gpu_anchor128.py`: naive fp32 eager, and bf16 + channels_last + torch.compile, both on
one fixed synthetic batch (no input pipeline at all). Ratios are measured in the same run. MFU is
against the bf16 dense peak of an H100/H200 (989 TFLOP/s); on a CPU it is not reported.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from funmatch import config, runtime
from funmatch.app.bench_loader import natural_images
from funmatch.data import prepared
from funmatch.recipe import models
from funmatch.stages import distill

log = logging.getLogger(__name__)
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16


def synthetic_artifacts(cfg: config.Config, root: Path, images: int, num_classes: int) -> tuple[Path, Path]:
    """A dataset artifact at the stored resolution in `data.encoding` (raw: uniform noise; jpeg: photograph-
    like 1/f images, so that decoding costs what it would), and a teacher artifact."""
    d = cfg.data
    size = d.stored_resolution
    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    x = (
        np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)
        if d.encoding == "raw"
        else natural_images(images, size)
    )
    y = np.arange(images) % num_classes
    splits = {
        s: prepared.write_split(dataset, s, x[:n], y[:n], d.shard_size, num_classes, d.encoding, d.jpeg_quality)
        for s, n in (("train", images), ("val", num_classes), ("test", num_classes))
    }
    classes = [f"class_{i}" for i in range(num_classes)]
    (dataset / "manifest.json").write_text(
        json.dumps(
            {
                "format": prepared.FORMAT,
                "source": "synthetic",
                "classes": classes,
                "num_classes": num_classes,
                "stored_resolution": size,
                "encoding": d.encoding,
                "splits": splits,
                "skipped": {"count": 0, "files": []},
            }
        )
    )
    t = cfg.teacher
    resolutions = config.member_resolutions(t)
    members = [models.create_model(t.arch, num_classes, stem_pool=t.stem_pool, zero_head=False) for _ in resolutions]
    info = {
        "role": "teacher",
        "arch": t.arch,
        "resolution": t.resolution,
        "stem_pool": t.stem_pool,
        "classes": classes,
        "member_resolutions": resolutions,
    }
    models.save_bundle(root / "teacher", members, info)
    return dataset, root / "teacher"


def baseline(cfg: config.Config, device: torch.device, num_classes: int, steps: int, fast: bool) -> dict:
    """gpu_anchor128's step on one synthetic batch: naive fp32 eager, or bf16 + channels_last + compile."""
    torch.manual_seed(0)
    b, res = cfg.distill.batch_size, cfg.student.resolution
    fmt = torch.channels_last if fast and device.type == "cuda" else torch.contiguous_format
    teacher = models.create_model(cfg.teacher.arch, num_classes, zero_head=False, device=device).eval()
    student = models.create_model(cfg.student.arch, num_classes, zero_head=False, device=device).train()
    teacher.requires_grad_(False)
    teacher, student = teacher.to(memory_format=fmt), student.to(memory_format=fmt)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    t_fwd, s_fwd = (torch.compile(teacher), torch.compile(student)) if fast else (teacher, student)
    src_t = torch.rand(b, 3, cfg.teacher.resolution, cfg.teacher.resolution, device=device).to(memory_format=fmt)
    src_s = (
        src_t
        if cfg.teacher.resolution == res
        else F.interpolate(src_t, size=res, mode="bilinear").to(memory_format=fmt)
    )
    amp = runtime.autocast(device, "bf16" if fast else "fp32")

    def step() -> None:
        with amp:
            with torch.no_grad():
                t = t_fwd(0.7 * src_t + 0.3 * src_t.roll(1, 0))
            s = s_fwd(0.7 * src_s + 0.3 * src_s.roll(1, 0))
        loss = F.kl_div(
            F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), reduction="batchmean", log_target=True
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    first = time.perf_counter()
    step()
    runtime.synchronize(device)
    first = time.perf_counter() - first
    flops = None
    if not fast:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(2):
        step()
    runtime.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    runtime.synchronize(device)
    sec = (time.perf_counter() - t0) / steps
    return {
        "img_per_s": round(b / sec, 1),
        "step_ms": round(sec * 1e3, 2),
        "first_call_s": round(first, 1),
        "flops_per_step": flops,
    }


def bench_distill(preset: str, overrides: list[str], steps: int, compile_baseline: bool = True) -> dict:
    """Runs the real loop and the baselines with the preset's models, resolutions and batch size."""
    cfg = config.load(preset, overrides)
    device = runtime.setup(cfg.runtime)
    num_classes = 10 if cfg.data.source == "demo" else 1000
    images = max(cfg.distill.batch_size * 4, 64)
    warm = min(10, steps)  # distill.run times from step min(10, steps/4): give it the steps to time
    total = steps + warm * 4
    cfg = config.apply_overrides(
        cfg,
        {
            "distill.epochs": total * cfg.distill.batch_size / images,
            "distill.warmup_steps": min(cfg.distill.warmup_steps, total - 1),
            "distill.eval_every": 0,
            "distill.log_every": total,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        dataset, teacher = synthetic_artifacts(cfg, Path(tmp), images, num_classes)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        info = distill.run(cfg, dataset, teacher, Path(tmp) / "student")
    naive = baseline(cfg, device, num_classes, steps, fast=False)
    fast = baseline(cfg, device, num_classes, steps, fast=True) if compile_baseline else None
    flops_per_img = naive["flops_per_step"] / cfg.distill.batch_size
    cuda = device.type == "cuda"

    def mfu(img_per_s: float) -> float | None:
        return round(flops_per_img * img_per_s / PEAK_BF16, 4) if cuda else None

    loop = {
        "img_per_s": info["img_per_s"],
        "mfu": mfu(info["img_per_s"]),
        "peak_mem_gb": info["peak_mem_gb"],
        "precision": cfg.runtime.precision,
        "compile": cfg.runtime.compile,
    }
    result = {
        "preset": preset,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "teacher": f"{cfg.teacher.arch}@{cfg.teacher.resolution}",
        "student": f"{cfg.student.arch}@{cfg.student.resolution}",
        "batch": cfg.distill.batch_size,
        "gflop_per_img": round(flops_per_img / 1e9, 3),
        "loop": loop,
        "naive_fp32": naive | {"mfu": mfu(naive["img_per_s"])},
        "compile_bf16_cl": fast and fast | {"mfu": mfu(fast["img_per_s"])},
        "ratio_to_naive": round(loop["img_per_s"] / naive["img_per_s"], 3),
        "ratio_to_compile": round(loop["img_per_s"] / fast["img_per_s"], 3) if fast else None,
    }
    return result


def command(args) -> int:
    result = bench_distill(args.preset, args.overrides, args.steps, compile_baseline=not args.no_compile_baseline)
    loop, naive, fast = result["loop"], result["naive_fp32"], result["compile_bf16_cl"]
    print(
        f"bench distill {result['preset']} on {result['device']}: {result['teacher']} → {result['student']}, "
        f"batch {result['batch']}, {result['gflop_per_img']} GFLOP/img"
    )
    print(f"  funmatch loop     {loop['img_per_s']:>10.1f} img/s  MFU {loop['mfu']}  peak {loop['peak_mem_gb']} GB")
    print(f"  naive fp32 eager  {naive['img_per_s']:>10.1f} img/s  MFU {naive['mfu']}")
    if fast:
        print(f"  bf16+cl+compile   {fast['img_per_s']:>10.1f} img/s  MFU {fast['mfu']}")
    print(f"  ratio to naive {result['ratio_to_naive']}, to compile {result['ratio_to_compile']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
