"""The architectures funmatch knows, by name, and the checks a config gets for them (no torch here:
`funmatch.recipe.models` builds the networks).

Besides the names in `ARCHS`: `timm:<name>` is any timm architecture (built with pretrained=False; the
name is checked against timm's registry, which imports timm, and so torch, only when such a name is
configured), and `onnx` is a teacher given as `.onnx` files (nothing is built).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from funmatch.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    family: str  # bit | torchvision | mobilenetv3 | timm | onnx
    layers: tuple[int, ...] = ()
    width: int = 1
    channels: tuple[int, ...] = (256, 512, 1024, 2048)
    stem_chs: int = 64
    basic: bool = False
    gn_groups: int = 32
    resolution_multiple: int = 32  # output stride: smaller inputs leave nothing to pool
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


ARCHS: dict[str, Arch] = {
    "bit-r50x1": Arch("bit", (3, 4, 6, 3), 1),
    "bit-r50x3": Arch("bit", (3, 4, 6, 3), 3),
    "bit-r101x1": Arch("bit", (3, 4, 23, 3), 1),
    "bit-r101x3": Arch("bit", (3, 4, 23, 3), 3),
    "bit-r152x2": Arch("bit", (3, 8, 36, 3), 2),
    "bit-r152x4": Arch("bit", (3, 8, 36, 3), 4),
    # Small BiT-style nets (same blocks, norms and WS) for 2-core CPU demos and tests.
    "bit-r18-mini": Arch("bit", (2, 2, 2, 2), 1, (32, 64, 128, 256), 32, basic=True, gn_groups=8),
    "bit-r14-mini": Arch("bit", (1, 1, 1, 1), 1, (32, 64, 128, 256), 16, gn_groups=4),
    "resnet50": Arch("torchvision"),
    "mobilenetv3-large-gn": Arch("mobilenetv3", gn_groups=8),
}


TIMM_PREFIX = "timm:"  # timm:<name>: any timm architecture
ONNX = "onnx"  # a teacher given as .onnx files (teacher.init), run as it is
WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".bin")  # *.init files of a built architecture


def check_arch(key: str, name: str) -> Arch:
    """The architecture `name` (a known one, `timm:<name>` or `onnx`); ConfigError naming `key` if unknown."""
    if name.startswith(TIMM_PREFIX):
        return Arch("timm", resolution_multiple=1, extra={"name": _check_timm_name(key, name)})
    if name == ONNX:
        return Arch(ONNX, resolution_multiple=1)
    if name not in ARCHS:
        close = difflib.get_close_matches(name, list(ARCHS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{key}={name!r} is not a known architecture{hint} (known: {', '.join(ARCHS)}, timm:<name>, {ONNX})"
        )
    return ARCHS[name]


def _check_timm_name(key: str, arch: str) -> str:
    """The timm model name of `timm:<name>`; ConfigError with timm's closest names if timm has no such model."""
    import timm  # imports torch: only for a configured timm:<name>

    name = arch.removeprefix(TIMM_PREFIX)
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"{key}={arch!r} is not a timm architecture{hint} (timm.list_models() names them)")
    return name


def timm_fixed_size(name: str) -> int:
    """The input side a timm architecture is built for when it takes only that size (ViTs), else 0."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.fixed_input_size else 0


def check_resolution(key: str, arch: str, resolution: int) -> None:
    spec = check_arch(key, arch)
    fixed = timm_fixed_size(spec.extra["name"]) if spec.family == "timm" else 0
    if fixed and resolution != fixed:
        raise ConfigError(f"{key}={resolution} is not allowed: {arch} takes only {fixed}x{fixed} inputs")
    m = spec.resolution_multiple
    if resolution <= 0 or resolution % m:
        raise ConfigError(f"{key}={resolution} is not allowed: {arch} needs a positive multiple of {m}")
