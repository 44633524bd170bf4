"""Step checkpoints that a preempted run resumes from: safetensors tensors + JSON metadata.

A checkpoint `ckpt-<step>` holds the student and optimizer tensors and every RNG state as
safetensors (no pickle), and a JSON file with the step, the config hash, the optimizer's
hyperparameters and the tensors' sha256. The JSON is written last, so a checkpoint without it (or
whose checksum does not match) is incomplete and skipped with a warning. The frozen teacher is
never saved. Works on a local directory or a gs:// prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from funmatch import storage
from funmatch.errors import CheckpointError

log = logging.getLogger(__name__)
NAME = re.compile(r"ckpt-(\d{9})\.json$")


@dataclass
class Loaded:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True: the global MT19937's (name, keys, pos, has_gauss, gauss)
        raise CheckpointError(f"numpy's global RNG state is a {type(np_state).__name__}, expected the legacy tuple")
    tensors = {"rng/torch_cpu": torch.get_rng_state(), "rng/numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list, list]:
    state = optimizer.state_dict()
    tensors, scalars = {}, []
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.append([idx, key, value])
    return tensors, scalars, state["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: list, groups: list) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, key, value in scalars:
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


class CheckpointManager:
    """Saves every `every_steps` steps or `every_minutes`, whichever comes first; keeps the last `keep`."""

    def __init__(
        self,
        directory: str,
        config_hash: str,
        keep: int = 3,
        every_steps: int = 1000,
        every_minutes: float = 10.0,
        allow_config_change: bool = False,
    ):
        self.directory = directory.rstrip("/")
        self.config_hash = config_hash
        self.keep, self.every_steps, self.every_seconds = keep, every_steps, every_minutes * 60
        self.allow_config_change = allow_config_change
        self._last_save = time.monotonic()
        if not storage.is_gcs(self.directory) and Path(self.directory).is_dir():
            for tmp in Path(self.directory).glob(".ckpt-*.tmp"):  # left by a kill during a write
                tmp.unlink(missing_ok=True)

    def _path(self, step: int, ext: str) -> str:
        return f"{self.directory}/ckpt-{step:09d}.{ext}"

    def files(self, step: int) -> tuple[str, str]:
        """The (metadata JSON, safetensors tensors) URIs of checkpoint `step`; the metadata is written last."""
        return self._path(step, "json"), self._path(step, "safetensors")

    def steps(self) -> list[int]:
        """Steps with a metadata file, newest first."""
        if not storage.exists(self.directory):
            return []
        found = (NAME.search(f) for f in storage.list_files(self.directory))
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or time.monotonic() - self._last_save >= self.every_seconds

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None
    ) -> None:
        from safetensors.torch import save

        rng, rng_meta = _rng_tensors()
        opt_tensors, opt_scalars, groups = _optimizer_tensors(optimizer)
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()} | opt_tensors | rng
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        meta = {
            "step": step,
            "config_hash": self.config_hash,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "optimizer": {"param_groups": groups, "scalars": opt_scalars},
            "rng": rng_meta,
            "time": time.time(),
            "extra": extra or {},
        }
        storage.write_bytes(self._path(step, "safetensors"), blob)
        storage.write_bytes(self._path(step, "json"), json.dumps(meta).encode())  # commit point
        self._move_latest(step)
        self._last_save = time.monotonic()
        for old in self.steps()[self.keep :]:
            for ext in ("json", "safetensors"):
                storage.delete(self._path(old, ext))

    def _move_latest(self, step: int, attempts: int = 5) -> None:
        """Points `latest` at `step`: on GCS a compare-and-swap on the object generation (a stale writer,
        e.g. a zombie from a previous attempt, cannot move it back); locally an atomic rename."""
        uri = f"{self.directory}/latest"
        for _ in range(attempts):
            try:
                data, generation = storage.read_with_generation(uri)
                if json.loads(data)["step"] >= step:
                    return
            except (FileNotFoundError, ValueError, KeyError):
                generation = 0
            try:
                storage.write_bytes(
                    uri,
                    json.dumps({"step": step}).encode(),
                    if_generation_match=generation if storage.is_gcs(uri) else None,
                )
                return
            except storage.PreconditionFailed:
                continue  # another writer moved it: re-read and decide again
        raise CheckpointError(f"{uri}: could not move the pointer to step {step} after {attempts} attempts")

    def latest_step(self) -> int | None:
        """The step `latest` points at (None before the first checkpoint)."""
        try:
            return int(json.loads(storage.read_bytes(f"{self.directory}/latest"))["step"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def load_latest(self, only_step: int | None = None) -> Loaded | None:
        """The checkpoint `latest` points at, else the newest whose checksum holds; a corrupt one is
        reported and the previous one used. `only_step`: that step's checkpoint or None."""
        from safetensors.torch import load

        pointed = self.latest_step()
        listed = self.steps()
        order = ([pointed] if pointed in listed else []) + [s for s in listed if s != pointed]
        if only_step is not None:
            order = [s for s in order if s == only_step]
        for step in order:
            try:
                meta = json.loads(storage.read_bytes(self._path(step, "json")))
                blob = storage.read_bytes(self._path(step, "safetensors"))
            except (OSError, ValueError) as e:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", step, e)
                continue
            if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
                log.warning("checkpoint %s is corrupt (checksum mismatch); trying the previous one", step)
                continue
            if meta["config_hash"] != self.config_hash and not self.allow_config_change:
                raise CheckpointError(
                    f"{self._path(step, 'json')} was made with config {meta['config_hash']}, this run has "
                    f"{self.config_hash}; use another checkpoint directory, or set "
                    "runtime.allow_config_change=true to resume anyway"
                )
            try:  # never unpickled: anything but safetensors (a pickle under this name too) fails here
                tensors = load(blob)
            # SafetensorError for a bad header, KeyError for a dtype torch lacks ("F4"), torch's own errors
            # building the tensors: each means this checkpoint is not loadable, so the previous one is tried.
            except Exception as e:  # noqa: BLE001 (bytes of unknown origin: the failure modes are open-ended)
                log.warning("checkpoint %s is not a safetensors file (%s); trying the previous one", step, e)
                continue
            return Loaded(step, tensors, meta)
        return None

    @staticmethod
    def restore(loaded: Loaded, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.load_state_dict({k[6:]: v for k, v in loaded.tensors.items() if k.startswith("model/")})
        opt = loaded.meta["optimizer"]
        optimizer.load_state_dict(_optimizer_state(loaded.tensors, opt["scalars"], opt["param_groups"]))
        _restore_rng(loaded.tensors, loaded.meta["rng"])
