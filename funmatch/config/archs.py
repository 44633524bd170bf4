"""The architectures funmatch knows, by name, and the checks a config gets for them (no torch here:
`funmatch.recipe.models` builds the networks)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from funmatch.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    family: str  # bit | torchvision | mobilenetv3
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


def check_arch(key: str, name: str) -> Arch:
    if name not in ARCHS:
        close = difflib.get_close_matches(name, list(ARCHS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}={name!r} is not a known architecture{hint} (known: {', '.join(ARCHS)})")
    return ARCHS[name]


def check_resolution(key: str, arch: str, resolution: int) -> None:
    m = ARCHS[arch].resolution_multiple
    if resolution <= 0 or resolution % m:
        raise ConfigError(f"{key}={resolution} is not allowed: {arch} needs a positive multiple of {m}")
