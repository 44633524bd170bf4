"""BiT `.npz` checkpoints in either published key layout, read into a timm ResNetV2.

big_transfer's layout (`resnet/root_block/standardized_conv2d/kernel`, `resnet/block1/unit01/a/group_norm/gamma`,
`resnet/head/conv2d/kernel` [1,1,C,K]; some files name convs `standardized_conv2d_N`) and big_vision's own
(`root_block/conv_root/kernel`, `block1/unit01/conv1/kernel`, `gn1/scale` [1,1,1,C], `norm-pre-head/scale`,
`head/kernel` [C,K]). The correspondence is the one of big_vision's
`big_vision/models/bit_paper.py::maybe_convert_big_transfer_format`. Kernels are HWIO, turned OIHW here.
Arrays are read with allow_pickle=False; nothing is copied into the model before every key and shape fits.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from funmatch.errors import CheckpointError

BIG_TRANSFER, BIG_VISION = "big_transfer", "big_vision"
_BIG_VISION_ROOTS = re.compile(r"^(root_block|norm-pre-head|head|block\d+)/")
_NUMBERED_CONV = re.compile(r"/standardized_conv2d_\d+/")


@dataclass(frozen=True)
class Entry:
    """One tensor of the model: its state-dict name, its key in each layout, how its array converts."""

    param: str
    big_transfer: str
    big_vision: str
    kind: str  # conv | norm | head_kernel | head_bias

    def key(self, layout: str) -> str:
        return self.big_transfer if layout == BIG_TRANSFER else self.big_vision


def entries(model: nn.Module) -> list[Entry]:
    """Every tensor of a bottleneck BiT ResNetV2 (timm), in model order, with its keys in both layouts."""
    root = "resnet/root_block/standardized_conv2d/kernel"
    out = [Entry("stem.conv.weight", root, "root_block/conv_root/kernel", "conv")]
    stages: nn.Module = model.get_submodule("stages")
    for i, stage in enumerate(stages.children()):
        blocks: nn.Module = stage.get_submodule("blocks")
        for j, block in enumerate(blocks.children()):
            p, unit = f"stages.{i}.blocks.{j}.", f"block{i + 1}/unit{j + 1:02d}/"
            if getattr(block, "downsample", None) is not None:
                out.append(
                    Entry(
                        f"{p}downsample.conv.weight",
                        f"resnet/{unit}a/proj/standardized_conv2d/kernel",
                        f"{unit}conv_proj/kernel",
                        "conv",
                    )
                )
            for n, group in ((1, "a"), (2, "b"), (3, "c")):
                bt = f"resnet/{unit}{group}/"
                out += [
                    Entry(f"{p}norm{n}.weight", f"{bt}group_norm/gamma", f"{unit}gn{n}/scale", "norm"),
                    Entry(f"{p}norm{n}.bias", f"{bt}group_norm/beta", f"{unit}gn{n}/bias", "norm"),
                    Entry(f"{p}conv{n}.weight", f"{bt}standardized_conv2d/kernel", f"{unit}conv{n}/kernel", "conv"),
                ]
    return out + [
        Entry("norm.weight", "resnet/group_norm/gamma", "norm-pre-head/scale", "norm"),
        Entry("norm.bias", "resnet/group_norm/beta", "norm-pre-head/bias", "norm"),
        Entry("head.fc.weight", "resnet/head/conv2d/kernel", "head/kernel", "head_kernel"),
        Entry("head.fc.bias", "resnet/head/conv2d/bias", "head/bias", "head_bias"),
    ]


def detect(keys: list[str]) -> str | None:
    """big_transfer when a key is under `resnet/`, big_vision when one is under its top-level names, else None."""
    if any(k.startswith("resnet/") for k in keys):
        return BIG_TRANSFER
    if any(_BIG_VISION_ROOTS.match(k) for k in keys):
        return BIG_VISION
    return None


def _open(path: str) -> np.lib.npyio.NpzFile:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({e})") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not a readable .npz checkpoint (a single array, not an archive of named ones)")
    return z


def layout(path: str) -> str:
    """The file's key layout, from its key names alone (no array is read)."""
    with _open(path) as z:
        return _layout(path, list(z.files))


def _layout(path: str, keys: list[str]) -> str:
    found = detect(keys)
    if found is None:
        first = sorted(keys)[0] if keys else "(no keys)"
        raise CheckpointError(
            f"{path}: neither a big_transfer nor a big_vision BiT checkpoint (first key {first!r}; expected "
            "'resnet/root_block/standardized_conv2d/kernel' or 'root_block/conv_root/kernel')"
        )
    return found


def _convert(kind: str, array: np.ndarray) -> np.ndarray | None:
    """The array in PyTorch's shape (OIHW kernels, [C] norms, [K,C,1,1] head), or None if its shape has no such form."""
    if kind == "conv":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else None
    if kind == "norm":
        return array.reshape(-1) if array.ndim in (1, 4) and all(d == 1 for d in array.shape[:-1]) else None
    if kind == "head_kernel":
        if array.ndim == 4 and array.shape[:2] == (1, 1):
            return array.transpose(3, 2, 0, 1)
        return array.T[:, :, None, None] if array.ndim == 2 else None
    return array if array.ndim == 1 else None


def read(path: str, model: nn.Module, arch: str, *, load_head: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """The file's layout and the model's tensors from it (the head's only with `load_head`).

    Refuses with a CheckpointError naming the first offending key: a file in neither layout, a missing or
    unexpected key, a head for another number of classes, a shape or dtype that does not fit `arch`.
    """
    own = model.state_dict()
    wanted = entries(model)
    if {e.param for e in wanted} != set(own):
        raise CheckpointError(f"{path}: BiT .npz checkpoints load into a bottleneck BiT ResNetV2, not {arch}")
    num_classes = own["head.fc.weight"].shape[0]
    with _open(path) as z:
        found = _layout(path, list(z.files))
        names: dict[str, str] = {}  # layout key -> key in the file
        for k in sorted(z.files):
            canonical = _NUMBERED_CONV.sub("/standardized_conv2d/", k) if found == BIG_TRANSFER else k
            if canonical in names:
                raise CheckpointError(f"{path}: keys {names[canonical]!r} and {k!r} are the same tensor")
            names[canonical] = k
        head = {e.key(found) for e in wanted if e.kind.startswith("head")}
        known = {e.key(found) for e in wanted}
        needed = [e.key(found) for e in wanted if load_head or e.key(found) not in head]
        missing = [k for k in needed if k not in names]
        if missing:
            raise CheckpointError(f"{path} does not fit {arch}: missing key {missing[0]!r} ({found} layout)")
        extra = [names[k] for k in sorted(names) if k not in known]
        if extra:
            raise CheckpointError(f"{path} does not fit {arch}: unexpected key {extra[0]!r} ({found} layout)")
        kernel_key = next(e.key(found) for e in wanted if e.kind == "head_kernel")
        if load_head:
            classes = int(z[names[kernel_key]].shape[-1])
            if classes != num_classes:
                raise CheckpointError(
                    f"{path}: head {kernel_key!r} has {classes} classes but the dataset has {num_classes}; "
                    "fine-tune it (teacher.finetune=true) or give a teacher trained for these classes"
                )
        tensors = {}
        for e in wanted:
            key = e.key(found)
            if key in head and not load_head:
                continue
            try:
                array = z[names[key]]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise CheckpointError(f"{path}: {names[key]!r} is not a readable array ({err})") from err
            if not np.issubdtype(array.dtype, np.floating):
                raise CheckpointError(f"{path}: {names[key]!r} holds {array.dtype}, not floating-point weights")
            converted = _convert(e.kind, array)
            target = tuple(own[e.param].shape)
            if converted is None or converted.shape != target:
                raise CheckpointError(
                    f"{path} does not fit {arch}: {names[key]!r} has shape {array.shape}, "
                    f"not one that gives {e.param} {target}"
                )
            tensors[e.param] = torch.from_numpy(np.ascontiguousarray(converted, dtype=np.float32))
    return found, tensors
