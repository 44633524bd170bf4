"""Model zoo: BiT ResNet-v2 (GroupNorm + Weight Standardization) through timm, any timm architecture,
and ONNX teachers.

Names: `bit-r{50x1,101x1,50x3,101x3,152x2,152x4}` are the BiT models of the paper (teacher R152x2,
student R50x1); `bit-r18-mini` / `bit-r14-mini` are small BiT-style nets for CPU demos and tests;
`resnet50` is torchvision's BatchNorm ResNet-50; `mobilenetv3-large-gn` is MobileNetV3-Large with
GroupNorm (8 groups) as in the paper; `timm:<name>` is any timm architecture (pretrained=False);
`onnx` is a teacher given as an `.onnx` file, run by onnxruntime (`OnnxModule`, frozen, CPU).
Checkpoints: BiT `.npz` (big_transfer's or big_vision's key layout, `funmatch.recipe.bit_npz`),
`.safetensors`, or a PyTorch state dict `.pt/.pth/.bin` (read by torch's weights-only loader, so never
unpickled into code).

Every model here takes our [-1, 1] views (augment.value_range). A teacher trained with another input
normalization (a timm model's pretrained_cfg mean/std, an ONNX model's metadata, or teacher.mean/std) is
wrapped in `Normalized`, which converts the views; the teacher artifact records it per member
(`normalization` in model.json) and `load_bundle` applies it, so the stages just call the models.
Nothing here downloads.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from funmatch.config.archs import ONNX, TIMM_PREFIX, check_arch
from funmatch.errors import CheckpointError, ConfigError
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
    if spec.family == ONNX:
        raise ConfigError(f"arch={arch!r} is a given .onnx model (load_onnx), not an architecture to build")
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
    elif spec.family == "timm":
        import timm

        model = timm.create_model(spec.extra["name"], pretrained=False, num_classes=num_classes)
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
    """Loads a local `.npz` (BiT, big_transfer or big_vision layout), `.safetensors` or PyTorch state dict
    (`.pt/.pth/.bin`) file into `model`, checking every key and shape first.

    `load_head=False` keeps the model's (new) head, as when fine-tuning for other classes.
    Raises CheckpointError naming the first tensor or key that does not fit `arch`.
    """
    num_classes = head_classes(model)
    if path.endswith(".npz"):
        spec = check_arch("arch", arch)
        if spec.family != "bit" or spec.basic:
            raise CheckpointError(f"{path}: BiT .npz checkpoints need a bottleneck BiT arch, not {arch}")
        from timm.models.resnetv2 import ResNetV2

        if not isinstance(model, ResNetV2):
            raise CheckpointError(f"{path}: BiT .npz checkpoints load into a timm ResNetV2, not {type(model).__name__}")
        layout, tensors = bit_npz.read(path, model, arch, load_head=load_head)
        log.info("%s: BiT .npz in %s layout", path, layout)
        model.load_state_dict(tensors, strict=load_head)
        return
    state = read_state_dict(path)
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


# where a training checkpoint keeps the model's weights, in the order timm's load_state_dict looks (EMA first)
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local `.safetensors` file or PyTorch state dict (`.pt/.pth/.bin`, loaded with
    weights_only=True: a file that needs full unpickling is refused, not run); CheckpointError otherwise."""
    if not path.endswith((".pt", ".pth", ".bin")):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    import re

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a corrupt file
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # code to run, not just tensors
        if needs:
            raise CheckpointError(
                f"{path} needs full unpickling (it holds {needs[1]}: a whole model saved with torch.save(model)?), "
                "which is refused: save model.state_dict() with torch.save, or a .safetensors file (from a "
                "training checkpoint you trust: load it yourself and torch.save its ['state_dict'])"
            ) from e
        # the weights-only loader's own first line suggests weights_only=False: not to be repeated here
        detail = "corrupt, or not torch.save's" if "Weights only load failed" in str(e) else _first_line(e)
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({detail})") from e
    if isinstance(state, dict):  # a training checkpoint of tensors only: its model weights, as timm reads them
        state = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), state)
        if state and all(isinstance(k, str) and k.startswith("module.") for k in state):  # saved from DDP
            state = {k.removeprefix("module."): v for k, v in state.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not a state dict of tensors: save model.state_dict()"
        )
    return state


def _first_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


# ---------------------------------------------------------------- input normalization, ONNX teachers

VALUE_RANGE = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # our [-1, 1] views, as mean/std on [0, 1]


class Normalized(nn.Module):
    """`model` fed our [-1, 1] views converted to its own input normalization: (p - mean) / std per
    channel, with p = (x + 1) / 2 the [0, 1] pixel."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 0.5 / s, persistent=False)
        self.register_buffer("shift", (0.5 - m) / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def normalization(
    arch: str, model: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> dict[str, Any]:
    """A teacher's input normalization {"mean", "std", "source"}: `mean`/`std` (teacher.mean/std) where
    given, else the model's own: a timm architecture's pretrained_cfg, an ONNX model's metadata_props
    `mean`/`std`, else (BiT and the other built-in names, ONNX without metadata) our [-1, 1]."""
    own, source = VALUE_RANGE, "[-1, 1]"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if arch.startswith(TIMM_PREFIX) and cfg.get("mean") and cfg.get("std"):
        own, source = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}, "timm pretrained_cfg"
    elif isinstance(model, OnnxModule) and model.stats:
        own, source = model.stats, "onnx metadata_props"
    if mean and std:
        source = "teacher.mean/std"
    elif mean or std:
        source = f"teacher.{'mean' if mean else 'std'} + {source}"
    return {"mean": list(mean or own["mean"]), "std": list(std or own["std"]), "source": source}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a Normalized (or `model` itself)."""
    return model.model if isinstance(model, Normalized) else model


def normalized(model: nn.Module, norm: dict[str, Any] | None) -> nn.Module:
    """`model` wrapped in Normalized for `norm` ({"mean", "std"}), or itself for our [-1, 1] (or None)."""
    if norm is None or (norm["mean"], norm["std"]) == (VALUE_RANGE["mean"], VALUE_RANGE["std"]):
        return model
    return Normalized(model, norm["mean"], norm["std"])


class OnnxModule(nn.Module):
    """A frozen ONNX classifier run by onnxruntime on the CPU: N×3×H×W float32 images in, N×classes logits
    out (on the input's device). The file is checked when loaded: one float32 image-batch input with a
    dynamic batch axis (a fixed H×W must be square), one N×classes output. `data` keeps the file's bytes
    for the model artifact; `stats` the metadata_props `mean`/`std` when the file has both."""

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__()
        import onnxruntime as ort

        from funmatch.config import channel_stats

        self.data, self.source = data, source
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own kinds for a bad file
            raise CheckpointError(f"{source}: not a readable ONNX model ({_first_line(e)})") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        if len(shape) != 4 or inputs[0].type != "tensor(float)" or shape[1] != 3:
            got = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
            raise CheckpointError(f"{source} takes {got}; expected one float32 image batch N×3×H×W")
        if isinstance(shape[0], int):
            raise CheckpointError(
                f"{source} takes batches of exactly {shape[0]} images; export it with a dynamic batch axis "
                "(torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'<input>': {0: 'batch'}})"
            )
        if isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] != shape[3]:
            raise CheckpointError(f"{source} takes {shape[2]}x{shape[3]} images; expected a square or dynamic size")
        out = list(outputs[0].shape) if len(outputs) == 1 else []
        if len(out) != 2:
            got = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in outputs)
            raise CheckpointError(f"{source} returns {got}; expected one N×classes logits output")
        self.input_name = inputs[0].name
        self.resolution = shape[2] if isinstance(shape[2], int) else 0  # 0: any
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            mean, std = (
                channel_stats(f"{source} metadata_props {k}", meta.get(k, "").strip("[]() ")) for k in ("mean", "std")
            )
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        self.stats = {"mean": list(mean), "std": list(std)} if mean and std else None
        log.info("%s: ONNX teacher, run by onnxruntime on the CPU (not converted to torch)", source)

    def check(self, num_classes: int, resolution: int, key: str) -> None:
        """CheckpointError unless the model takes `resolution`² views (`key`: the config key that sets
        it) and returns `num_classes` logits per image: a one-image forward, before any training."""
        if self.resolution and self.resolution != resolution:
            raise CheckpointError(
                f"{self.source} takes {self.resolution}x{self.resolution} images, not {key}={resolution}; "
                f"set {key}={self.resolution}"
            )
        try:
            logits = self(torch.zeros(1, 3, resolution, resolution))
        except Exception as e:  # onnxruntime refuses a shape the graph does not take
            raise CheckpointError(
                f"{self.source} fails on a 1x3x{resolution}x{resolution} batch ({_first_line(e)})"
            ) from e
        if tuple(logits.shape) != (1, num_classes):
            raise CheckpointError(
                f"{self.source} returns {tuple(logits.shape[1:])} logits per image; the data has {num_classes} classes"
            )

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: str) -> OnnxModule:
    """The local `.onnx` file `path` as a checked OnnxModule (CheckpointError if unreadable or not a classifier)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable ONNX model ({_first_line(e)})") from e
    return OnnxModule(data, path)


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


# ---------------------------------------------------------------- model artifacts


def save_bundle(out_dir: str | Path, members: list[nn.Module], info: dict[str, Any]) -> None:
    """A model artifact: `model.json` (arch, resolution, classes, ...) + one file per member: the weights
    as safetensors (of the model inside a Normalized: info["normalization"] records that), or an ONNX
    teacher's own `.onnx` file."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, m in enumerate(members):
        inner = unwrap(m)
        if isinstance(inner, OnnxModule):
            files.append(f"member-{i}.onnx")
            (out / files[-1]).write_bytes(inner.data)
        else:
            files.append(f"member-{i}.safetensors")
            save_weights(inner, out / files[-1])
    (out / "model.json").write_text(json.dumps(info | {"members": files}, indent=1))


def load_bundle(bundle_dir: str | Path, device: torch.device | str = "cpu") -> tuple[list[nn.Module], dict]:
    """The models of an artifact written by `save_bundle`, in eval mode, each behind its recorded input
    normalization (info["normalization"], one per member; none: [-1, 1]), and its info."""
    import json

    from safetensors.torch import load_file

    bundle = Path(bundle_dir)
    info = json.loads((bundle / "model.json").read_text())
    norms = info.get("normalization") or [None] * len(info["members"])
    members = []
    for f, norm in zip(info["members"], norms, strict=True):
        m: nn.Module
        if f.endswith(".onnx"):
            m = load_onnx(str(bundle / f))
        else:
            m = create_model(
                info["arch"], len(info["classes"]), stem_pool=info.get("stem_pool", "zero_pad"), zero_head=False
            )
            m.load_state_dict(load_file(str(bundle / f)))
        members.append(normalized(m, norm).to(device).eval())
    return members, info


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, weight standardisation folded: the teacher as distillation runs it."""
    model.eval().requires_grad_(False)
    return fold_weight_standardization(model)
