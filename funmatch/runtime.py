"""Device, threads, seeds, precision, logging and the machine: what every stage sets up the same way.

torch and numpy are imported inside the functions that use them, so that the launcher side (e.g.
`funmatch.launch.trainjob`, which only needs `setup_logging`) does not import them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from funmatch.config import ResourcesConfig, RuntimeConfig
from funmatch.errors import FunmatchError

if TYPE_CHECKING:
    import torch


def setup_logging() -> None:
    """Warnings from libraries, INFO from funmatch, one timestamped line each on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("funmatch").setLevel(logging.INFO)


def setup(rt: RuntimeConfig, resources: ResourcesConfig | None = None) -> torch.device:
    """Sets up logging, seeds every generator, sets threads and deterministic CPU kernels, picks the device.

    `resources`: what the task was given (a GPU stage passes `cfg.resources`). Never a silent CPU fallback:
    with GPUs given (`accelerator_count` >= 1) or `runtime.device=cuda*` and no CUDA device to see, the stage
    stops here, saying why, in one line (FunmatchError). `runtime.device=cpu` always runs on the CPU."""
    import numpy as np
    import torch

    setup_logging()
    device = _device(rt, resources)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # runtime code never downloads
    if rt.num_threads:
        torch.set_num_threads(rt.num_threads)
    random.seed(rt.seed)
    np.random.seed(rt.seed)
    torch.manual_seed(rt.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _device(rt: RuntimeConfig, resources: ResourcesConfig | None) -> torch.device:
    """`runtime.device` on this machine; FunmatchError when CUDA was asked for (or given) and none is seen."""
    import torch

    if rt.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if rt.device == "auto" else rt.device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = (
        f"CUDA sees no device (CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}, torch "
        f"{torch.__version__} {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'built without CUDA'})"
    )
    if resources is not None and resources.accelerator_count >= 1:
        n, kind = resources.accelerator_count, resources.accelerator_type
        raise FunmatchError(
            f"runtime: this task was given {n} {kind} (resources.accelerator_count={n}) but {seen}; "
            "check the pod's GPU limit and node (kubectl describe pod), or run on the CPU with "
            "resources.accelerator_count=0 or runtime.device=cpu"
        )
    if rt.device != "auto":
        raise FunmatchError(f"runtime: runtime.device={rt.device} but {seen}; use runtime.device=auto or cpu")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; fp32 otherwise."""
    import torch

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


def synchronize(device: torch.device) -> None:
    """Waits until the device has run everything queued on it (a no-op on the CPU): for timing."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What a measurement depends on: CPU model, architecture and logical CPUs, OS, load average, Python,
    torch and its intra-op threads, and the accelerator (`device`'s name when it is a GPU, else "CPU")."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    gpu = device is not None and device.type == "cuda"
    return {
        "cpu": cpu or platform.machine(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1_5_15": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(device) if gpu else "CPU",
    }


class Stopwatch:
    """Seconds since it was made, rounded to milliseconds, each time it is called."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)
