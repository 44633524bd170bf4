"""`funmatch bench loader`: the streaming input pipeline's own throughput, no training.

Reads a prepared dataset artifact — yours (`--dataset`), or a synthetic JPEG one at the preset's stored
resolution whose images have the 1/f amplitude spectrum of photographs (so they cost about what
photographs cost to decode; the bytes per image are reported to compare), letterboxed like prepared
photographs (frames of width:height 4:3, 4:3, 3:4, 1:1 in turn, the rest of the canvas zero) — through
`funmatch.data.loader.Batches` exactly as distill streams it: seeded batches, DataLoader worker processes,
pinned memory, copy to the device. For each worker count asked it prints img/s and img/s per worker,
and the single-process decode rate, and writes them as JSON. Decoding is libjpeg-turbo at the full
stored size (no reduced-size DCT decoding: the crops are drawn after decoding, from the whole frame).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from funmatch import config, runtime
from funmatch.data import loader, prepared


def natural_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n×size×size×3 uint8 images with a 1/f amplitude spectrum (luminance plus weaker chroma)."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    f[0, 0] = 1.0
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    mix = np.array([[1.0, 1.0, 1.0], [0.35, 0.0, -0.35], [-0.2, 0.4, -0.2]])  # luminance, two chroma axes
    for i in range(n):
        spectrum = (rng.standard_normal((3,) + f.shape) + 1j * rng.standard_normal((3,) + f.shape)) / f
        fields = np.fft.irfft2(spectrum, s=(size, size))
        fields /= fields[0].std() + 1e-12
        rgb = np.tensordot(fields, mix, axes=([0], [0]))
        out[i] = np.clip(128 + 50 * rgb, 0, 255).astype(np.uint8)
    return out


LETTERBOX_ASPECTS = ((3, 4), (3, 4), (4, 3), (1, 1))  # frame h:w in turn: mostly landscape, as photographs


def synthetic_dataset(root: Path, images: int, size: int, shard_size: int) -> Path:
    """A JPEG dataset artifact (quality 95, like `data.encoding=jpeg`) of natural-statistics images, each
    letterboxed to a frame of LETTERBOX_ASPECTS (long side = `size`) as prepare stores photographs."""
    root.mkdir(parents=True, exist_ok=True)
    x, y = natural_images(images, size), np.arange(images) % 10
    frames = np.array([LETTERBOX_ASPECTS[i % len(LETTERBOX_ASPECTS)] for i in range(images)], np.float64)
    frames = np.round(frames / frames.max(1, keepdims=True) * size).astype(np.int32)
    for im, (h, w) in zip(x, frames, strict=True):
        im[h:], im[:, w:] = 0, 0
    splits = {
        s: prepared.write_split(root, s, x[:n], y[:n], shard_size, 10, "jpeg", 95, frames[:n])
        for s, n in (("train", images), ("val", 10), ("test", 10))
    }
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "format": prepared.FORMAT,
                "source": "synthetic 1/f",
                "classes": [str(i) for i in range(10)],
                "num_classes": 10,
                "stored_resolution": size,
                "encoding": "jpeg",
                "jpeg_quality": 95,
                "splits": splits,
                "skipped": {"count": 0, "files": []},
            }
        )
    )
    return root


def measure(dataset: Path, device: torch.device, batch_size: int, steps: int, workers: int, decode: str) -> dict:
    """img/s of `steps` streamed batches after the workers' first batches (start-up excluded)."""
    batches = loader.Batches(
        dataset, device, 0.0, batch_size, seed=0, rows=torch.arange(batch_size), workers=workers, jpeg_decode=decode
    )
    warm = batches.workers
    t0 = 0.0
    for i, (batch, _) in enumerate(batches.iterate(0, warm + steps)):  # noqa: B007 (the last one's shape is reported)
        if i == warm - 1:
            runtime.synchronize(device)
            t0 = time.perf_counter()
    runtime.synchronize(device)
    rate = steps * batch_size / (time.perf_counter() - t0)
    return {
        "workers": batches.workers,
        "decode": decode,
        "img_per_s": round(rate, 1),
        "img_per_s_per_worker": round(rate / batches.workers, 1),
        "batch_shape": list(batch.shape),
    }


def single_process_rate(dataset: Path, batch_size: int, batches: int) -> float:
    """img/s of ShardedImages.gather in this process: one core's decode rate."""
    source = prepared.ShardedImages(dataset, "train")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for step in range(batches):
        source.gather(prepared.batch_indices(step, batch_size, len(source), 0).numpy())
    return round(batches * batch_size / (time.perf_counter() - t0), 1)


def bench_loader(
    preset: str,
    overrides: list[str],
    dataset: str,
    images: int,
    batch_size: int,
    steps: int,
    workers: list[int],
    decode: str,
) -> dict:
    cfg = config.load(preset, overrides)
    device = runtime.setup(cfg.runtime)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = (
            Path(dataset)
            if dataset
            else synthetic_dataset(Path(tmp) / "dataset", images, cfg.data.stored_resolution, cfg.data.shard_size)
        )
        manifest = prepared.read_manifest(path)
        source = prepared.ShardedImages(path, "train")
        stored = sum((path / sh["images"]).stat().st_size for sh in manifest["splits"]["train"]["shards"])
        one_core = single_process_rate(path, batch_size, max(2, steps // 4))
        torch.set_num_threads(threads)
        runs = [measure(path, device, batch_size, steps, w, decode) for w in workers]
    return {
        "dataset": dataset or f"synthetic 1/f, {images} images",
        "encoding": source.encoding,
        "stored_resolution": manifest["stored_resolution"],
        "train_images": len(source),
        "bytes_per_image": round(stored / len(source)),
        "resident_bytes_per_image": source.nbytes // len(source) + 8,  # the uint8 canvas + its int32 frame
        "batch_size": batch_size,
        "steps": steps,
        "device": str(device),
        "cpus": os.cpu_count(),
        "single_process_img_per_s": one_core,
        "runs": runs,
    }


def command(args) -> int:
    workers = [int(w) for w in str(args.workers).split(",")]
    result = bench_loader(
        args.preset, args.overrides, args.dataset, args.images, args.batch_size, args.steps, workers, args.decode
    )
    print(
        f"bench loader: {result['dataset']} ({result['encoding']}, {result['stored_resolution']} px, "
        f"{result['bytes_per_image']} B/img stored, {result['resident_bytes_per_image']} B/img resident), "
        f"batch {result['batch_size']}, {result['cpus']} CPUs, "
        f"to {result['device']}"
    )
    print(f"  one process, no workers  {result['single_process_img_per_s']:>9.1f} img/s")
    for run in result["runs"]:
        print(
            f"  {run['workers']:>2} worker(s), decode {run['decode']:<6} {run['img_per_s']:>9.1f} img/s "
            f"({run['img_per_s_per_worker']:.1f} per worker)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
