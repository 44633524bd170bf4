"""Device, threads, seeds, precision and progress: what every stage sets up the same way."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from funmatch.config import RuntimeConfig

log = logging.getLogger("funmatch")


def setup(rt: RuntimeConfig) -> torch.device:
    """Seeds every generator, sets threads and deterministic CPU kernels, picks the device."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("funmatch").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # runtime code never downloads
    if rt.num_threads:
        torch.set_num_threads(rt.num_threads)
    random.seed(rt.seed)
    np.random.seed(rt.seed)
    torch.manual_seed(rt.seed)
    if rt.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(rt.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            log.warning("runtime.device=%s but no CUDA device is visible; using the CPU", rt.device)
            device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without making the host wait for the GPU: through pinned memory, non-blocking. (A
    plain `.to("cuda")` of a pageable tensor synchronizes the stream: the host would stop queueing the
    next step's kernels until the GPU has drained.)"""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)
