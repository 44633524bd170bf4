"""Model zoo: BiT ResNet-v2 (GroupNorm + Weight Standardization) through timm, plus alternative students.

Names: `bit-r{50x1,101x1,50x3,101x3,152x2,152x4}` are the BiT models of the paper (teacher R152x2,
student R50x1); `bit-r18-mini` / `bit-r14-mini` are small BiT-style nets for CPU demos and tests;
`resnet50` is torchvision's BatchNorm ResNet-50; `mobilenetv3-large-gn` is MobileNetV3-Large with
GroupNorm (8 groups) as in the paper. Checkpoints: BiT `.npz` (big_transfer's or big_vision's key layout,
`funmatch.recipe.bit_npz`) or `.safetensors` (a state dict). Nothing here downloads.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from funmatch.config.archs import ARCHS, check_arch
from funmatch.errors import CheckpointError
from funmatch.recipe import bit_npz

log = logging.getLogger(__name__)


def create_model(
    arch: str,
    num_classes: int,
    *,
    stem_pool: str = "zero_pad",
    zero_head: bool = True,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A freshly initialised model; `zero_head` zeroes the classifier (uniform first predictions)."""
    spec = check_arch("arch", arch)
    model: nn.Module
    if spec.family == "bit":
        from timm.layers import GroupNormAct, StdConv2d
        from timm.models.resnetv2 import ResNetV2

        model = ResNetV2(
            layers=list(spec.layers),
            channels=spec.channels,
            width_factor=spec.width,
            stem_chs=spec.stem_chs * spec.width,
            basic=spec.basic,
            num_classes=num_classes,
            # zero_pad: big_transfer's zero padding + VALID max-pool; neg_inf_pad: big_vision's
            # bit_paper, whose max-pool pads with -inf (recipe.md §2.1).
            stem_type="fixed" if stem_pool == "zero_pad" else "",
            conv_layer=partial(StdConv2d, eps=1e-8),
            norm_layer=partial(GroupNormAct, num_groups=spec.gn_groups),
            device=device,
        )
    elif spec.family == "torchvision":
        import torchvision

        model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    else:
        import timm

        model = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=num_classes)
        _batchnorm_to_groupnorm(model, spec.gn_groups)
    if device is not None:
        model.to(device)
    if zero_head:
        head = classifier(model)
        nn.init.zeros_(head.weight)
        if head.bias is not None:  # every head here has one; without, the zero weight alone is uniform
            nn.init.zeros_(head.bias)
    return model


def _batchnorm_to_groupnorm(model: nn.Module, groups: int) -> None:
    """Swaps timm's BatchNormAct2d for GroupNormAct with the same activation (the paper's MobileNet-GN)."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BatchNormAct2d):
                gn = GroupNormAct(child.num_features, num_groups=groups, apply_act=False)
                gn.act = child.act
                setattr(module, name, gn)


def classifier(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The final layer (timm models: get_classifier(); torchvision ResNet: fc)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else model.fc
    if not isinstance(head, nn.Linear | nn.Conv2d):
        raise TypeError(f"{type(model).__name__}: the classifier is a {type(head).__name__}, not a Linear or Conv2d")
    return head


def head_classes(model: nn.Module) -> int:
    head = classifier(model)
    return head.out_channels if isinstance(head, nn.Conv2d) else head.out_features


# ---------------------------------------------------------------- checkpoints


def load_init(model: nn.Module, arch: str, path: str, *, load_head: bool) -> None:
    """Loads a local `.npz` (BiT, big_transfer or big_vision layout) or `.safetensors` file into `model`,
    checking every key and shape first.

    `load_head=False` keeps the model's (new) head, as when fine-tuning for other classes.
    Raises CheckpointError naming the first tensor or key that does not fit `arch`.
    """
    num_classes = head_classes(model)
    if path.endswith(".npz"):
        if ARCHS[arch].family != "bit" or ARCHS[arch].basic:
            raise CheckpointError(f"{path}: BiT .npz checkpoints need a bottleneck BiT arch, not {arch}")
        from timm.models.resnetv2 import ResNetV2

        if not isinstance(model, ResNetV2):
            raise CheckpointError(f"{path}: BiT .npz checkpoints load into a timm ResNetV2, not {type(model).__name__}")
        layout, tensors = bit_npz.read(path, model, arch, load_head=load_head)
        log.info("%s: BiT .npz in %s layout", path, layout)
        model.load_state_dict(tensors, strict=load_head)
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    own = model.state_dict()
    head_keys = {k for k in own if _is_head_key(model, k)}
    wanted = {k: v for k, v in own.items() if load_head or k not in head_keys}
    missing = sorted(set(wanted) - set(state))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    unexpected = sorted(set(state) - set(own))
    if missing or wrong or unexpected:
        head_mismatch = wrong and all(w.split()[0] in head_keys for w in wrong) and not missing
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:3]}" if missing else "",
                    f"shape {wrong[:3]}" if wrong else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                ],
            )
        )
        hint = (
            " (only the head differs: set teacher.finetune=true to fine-tune it for these classes)"
            if head_mismatch
            else ""
        )
        raise CheckpointError(f"{path} does not fit {arch} with {num_classes} classes: {detail}{hint}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)


def _is_head_key(model: nn.Module, key: str) -> bool:
    head = classifier(model)
    names = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p in ("weight", "bias")}
    return key in names


def init_stem_pool(path: str, configured: str, key: str) -> str:
    """The stem max-pool padding for a model initialised from the local file `path` (`key`: the config key).

    A big_vision-layout `.npz` gets `neg_inf_pad`, the padding of big_vision's bit_paper that trained it,
    whatever `configured` says (logged when that differs); anything else keeps `configured`, and an explicit
    `neg_inf_pad` for a big_transfer-layout file is kept with a warning.
    """
    if not path.endswith(".npz"):
        return configured
    layout = bit_npz.layout(path)
    if layout == bit_npz.BIG_VISION:
        if configured != "neg_inf_pad":
            log.info("%s: big_vision layout, so %s=neg_inf_pad (bit_paper's -inf max-pool padding)", path, key)
        return "neg_inf_pad"
    if configured != "zero_pad":
        log.warning("%s: big_transfer layout (zero max-pool padding) but %s=%s: keeping %s", path, key, configured, key)
    return configured


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """Replaces every StdConv2d by a plain Conv2d holding the standardised weights (in place).

    Exact for inference; used for the frozen teacher (fewer ops per step) and the ONNX export.
    """
    from timm.layers import StdConv2d

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, StdConv2d):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    _pair(child.kernel_size),
                    _pair(child.stride),
                    child.padding if isinstance(child.padding, str) else _pair(child.padding),
                    _pair(child.dilation),
                    child.groups,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    w = child.weight.reshape(1, child.out_channels, -1)
                    w = torch.nn.functional.batch_norm(w, None, None, training=True, momentum=0.0, eps=child.eps)
                    conv.weight.copy_(w.reshape_as(child.weight))
                    if child.bias is not None and conv.bias is not None:  # conv has a bias iff child has
                        conv.bias.copy_(child.bias)
                setattr(module, child_name, conv)
    return model


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (height, width) setting; torch types these as tuple[int, ...]."""
    height, width = value
    return height, width


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


# ---------------------------------------------------------------- model artifacts


def save_bundle(out_dir: str | Path, members: list[nn.Module], info: dict[str, Any]) -> None:
    """A model artifact: `model.json` (arch, resolution, classes, ...) + one safetensors file per member."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, m in enumerate(members):
        files.append(f"member-{i}.safetensors")
        save_weights(m, out / files[-1])
    (out / "model.json").write_text(json.dumps(info | {"members": files}, indent=1))


def load_bundle(bundle_dir: str | Path, device: torch.device | str = "cpu") -> tuple[list[nn.Module], dict]:
    """The models of an artifact written by `save_bundle`, in eval mode, and its info."""
    import json

    from safetensors.torch import load_file

    bundle = Path(bundle_dir)
    info = json.loads((bundle / "model.json").read_text())
    members = []
    for f in info["members"]:
        m = create_model(
            info["arch"], len(info["classes"]), stem_pool=info.get("stem_pool", "zero_pad"), zero_head=False
        )
        m.load_state_dict(load_file(str(bundle / f)))
        members.append(m.to(device).eval())
    return members, info


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, weight standardisation folded: the teacher as distillation runs it."""
    model.eval().requires_grad_(False)
    return fold_weight_standardization(model)
