"""The distill loop's input: uint8 NHWC batches of the train split on the training device, step by step,
with their images' frames (N×2 int32 (h, w) on the CPU: where each image lies on its canvas).

Resident: a train split up to `runtime.resident_max_gb` (decoded) is held on the device (its frames, 8 bytes
an image, on the host); a batch is one gather there. Streamed: a larger split is read from its memory-mapped
shards by DataLoader worker processes, each building whole batches (raw shards: a copy; jpeg shards:
libjpeg-turbo decode) a few steps ahead, in pinned memory, copied to the device without blocking. With
`runtime.jpeg_decode=device` the workers only read the JPEG bytes and the device decodes the batch (nvJPEG on a GPU).

The batch of step s is a pure function of (seed, s) on every path, so a resumed run sees the same data.
Under DDP each rank builds only the rows its views use (`augment.shard_rows`).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from funmatch import runtime
from funmatch.data import prepared

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 32
PREFETCH = 2  # batches queued per worker
SHM = "/dev/shm"  # DataLoader hands every batch over through shared memory


def plan_workers(requested: int, batch_bytes: int) -> int:
    """Worker processes for the streamed loader: `runtime.loader_workers`, or (0) this process's share
    of the CPUs it may run on, less one for the training loop, at most 32 — and never more batches in
    flight (workers × PREFETCH) than half of /dev/shm's free space holds. torchrun's processes on one
    node share both."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = requested or max(1, min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) // local - 1))
    if os.path.isdir(SHM):
        shm = os.statvfs(SHM)
        fits = int(shm.f_bavail * shm.f_frsize / 2 / local // (batch_bytes * PREFETCH))
        if fits < workers:
            log.warning(
                "loader: %d worker(s) instead of %d: %s has room for %d batches of %.0f MB in flight "
                "(raise the pod's shm size)",
                max(1, fits),
                workers,
                SHM,
                fits * PREFETCH,
                batch_bytes / 1e6,
            )
            workers = max(1, fits)
    return workers


def _ignore_sigterm(worker_id: int) -> None:
    """Workers leave a preemption to the trainer (which checkpoints, then exits and so stops them)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StepBatches(Dataset):
    """Item s = the rows `rows` of step s's batch: (decoded uint8 N×S×S×3, or (when `encoded`) the JPEG
    bytes back to back with their N+1 offsets; their N×2 int32 frames)."""

    def __init__(
        self, source: prepared.ShardedImages, batch_size: int, seed: int, rows: torch.Tensor, encoded: bool = False
    ) -> None:
        self.source, self.batch_size, self.seed, self.rows, self.encoded = source, batch_size, seed, rows, encoded

    def __len__(self) -> int:
        return 2**62  # an endless stream of steps; the sampler says which

    def indices(self, step: int) -> np.ndarray:
        return prepared.batch_indices(step, self.batch_size, len(self.source), self.seed)[self.rows].numpy()

    def __getitem__(self, step: int):
        idx = self.indices(step)
        frames = torch.from_numpy(self.source.frames(idx))
        if not self.encoded:
            return torch.from_numpy(self.source.gather(idx)), frames
        blobs = self.source.encoded(idx)
        offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        return (torch.from_numpy(np.concatenate(blobs)), torch.from_numpy(offsets)), frames


def decode_packed(packed: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> torch.Tensor:
    """(bytes back to back, offsets) → N×S×S×3 uint8 decoded on `device`."""
    blob, offsets = packed
    bounds = offsets.tolist()
    return prepared.decode_jpegs([blob[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=False)], device)


class Batches:
    """The train split's batches for the steps [start, steps): (images on `device`, frames on the CPU)."""

    def __init__(
        self,
        dataset_dir: str | Path,
        device: torch.device,
        resident_max_gb: float,
        batch_size: int,
        seed: int,
        rows: torch.Tensor,
        workers: int = 0,
        jpeg_decode: str = "cpu",
    ) -> None:
        self.device, self.batch_size, self.seed, self.rows = device, batch_size, seed, rows
        self.source = prepared.ShardedImages(dataset_dir, "train")
        self.n = len(self.source)
        self.decode_on_device = jpeg_decode == "device" and self.source.encoding == "jpeg"
        self.resident, self.workers = None, 0
        self.resident_frames = torch.zeros(0, 2, dtype=torch.int32)
        if self.source.nbytes <= resident_max_gb * 2**30:
            images, _ = prepared.load_split(dataset_dir, "train")  # checksums verified
            self.resident = torch.from_numpy(images).to(device)
            self.resident_frames = torch.from_numpy(prepared.load_frames(dataset_dir, "train"))
        else:
            self.workers = plan_workers(workers, len(rows) * int(np.prod(self.source.image_shape)))

    def iterate(self, start: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.resident is not None:
            for step in range(start, steps):
                idx = prepared.batch_indices(step, self.batch_size, self.n, self.seed)[self.rows]
                yield self.resident[runtime.to_device(idx, self.device)], self.resident_frames[idx]
            return
        batches = StepBatches(self.source, self.batch_size, self.seed, self.rows, encoded=self.decode_on_device)
        loader = DataLoader(
            batches,
            sampler=range(start, steps),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda" and not self.decode_on_device,
            prefetch_factor=PREFETCH,
            worker_init_fn=_ignore_sigterm,
        )
        for batch, frames in loader:
            if self.decode_on_device:
                yield decode_packed(batch, self.device), frames
            else:
                yield batch.to(self.device, non_blocking=True), frames
