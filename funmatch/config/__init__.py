"""Typed configuration: YAML presets shipped in the package, overridden by dotted `--set KEY=VALUE`.

A preset file holds `description`, `expected` (metric, value, runtime) and `config` (a partial
`Config`); `base: NAME` inherits another preset. Files whose name starts with `_` are bases only.
Every value is checked here, before any data is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, get_type_hints

import yaml

from funmatch.config import archs
from funmatch.errors import ConfigError

# The paper's teaching variants (Fig. 3 / App. C, recipe.md §1): fix/* precompute the teacher's targets.
VARIANTS = ("fix/rs", "fix/cc", "fix/ic_ens", "ind/rc", "ind/ic", "same/rc", "same/ic", "funmatch")
# The earlier names, still accepted as they are (not rewritten, so their config hashes stay).
SETUP_ALIASES = {"fixed": "fix/cc", "independent": "ind/ic", "consistent": "same/ic"}
FIXED_SETUPS = ("fix/rs", "fix/cc", "fix/ic_ens", "fixed")  # the teacher's targets are precomputed once
SETUPS = ("fixed", "independent", "consistent", "funmatch")  # the four setups `experiment teaching-setups` compares


def canonical_setup(setup: str) -> str:
    """The paper's name of a `distill.setup` value (an alias maps to its variant, others stay)."""
    return SETUP_ALIASES.get(setup, setup)


OPTIMIZERS = ("adam", "shampoo")
STEM_POOLS = ("zero_pad", "neg_inf_pad")
PRECISIONS = ("fp32", "bf16")
JPEG_DECODERS = ("cpu", "device")
LABELS = ("folders", "none")  # data.labels
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def setting(
    default: Any,
    *,
    hashed: bool = True,
    parameter: str = "",
    parameter_type: type | None = None,
    hash_omit_default: bool = False,
) -> Any:
    """A config key with what it declares about itself. `hashed=False`: the key does not change the
    trained weights (logging, checkpoint cadence, device), so it stays out of `Config.hash()` and a run
    may resume with it changed. `parameter`: the name of the pipeline parameter that sets it from the
    Kubeflow UI (every such key is one input of the DAG and of the data prep task); `parameter_type`: that
    parameter's type when it is not the key's (the data prep task converts it back to the key's).
    `hash_omit_default`: a key added later that is left out of `Config.hash()` while it has its default,
    so configs written before it existed keep their hash."""
    return field(
        default=default,
        metadata={
            "hashed": hashed,
            "parameter": parameter,
            "parameter_type": parameter_type,
            "hash_omit_default": hash_omit_default,
        },
    )


@dataclass
class DataConfig:
    """Where images come from and how the prepared dataset artifact stores them."""

    # demo | an ImageFolder tree (local dir, gs:// prefix, or a .tar/.tar.gz/.zip of one)
    # | flowers102 | pets | food101 | sun397 | imagenet (these read `root`)
    source: str = setting("demo", parameter="data_source")
    root: str = ""  # for the named datasets: where their files are (a path or gs:// prefix)
    download: bool = False  # named torchvision datasets: fetch them into `root` (clusters with network only)
    stored_resolution: int = 160  # stored canvas side = each image's long side (aspect kept, letterboxed)
    # (0: derived from the model views by `stored_side`, what a user folder's preset uses)
    val_fraction: float = 0.1  # used only when the source has no val split
    test_fraction: float = 0.1  # used only when the source has no test split
    split_seed: int = 0
    shard_size: int = 4096  # images per shard file
    max_bad_fraction: float = 0.05  # more unreadable files than this fails the stage
    max_image_pixels: int = 89_478_485  # decompression-bomb limit (Pillow's default)
    max_train_per_class: int = 0  # keep only the first N train images per class (quick experiments); 0: all
    encoding: str = "raw"  # raw: uint8 arrays (small datasets, GPU-resident) | jpeg: streamed, decoded in parallel
    jpeg_quality: int = 95  # encoding=jpeg: quality of the re-encoded stored images
    # folders: labelled (class folders or the named datasets' labels) | none: `source` is images without labels
    # (found recursively), split seeded into train/val/test with label -1; needs a given teacher whose classes
    # the student learns, and evaluation reports agreement with the teacher instead of accuracy
    labels: str = setting("folders", hash_omit_default=True)


@dataclass
class TeacherConfig:
    """The frozen teacher; `init` may list several checkpoints (comma-separated) for an ensemble."""

    # a name of config/archs.py ARCHS | timm:<name> (any timm architecture) | onnx (`init` are .onnx files)
    arch: str = setting("bit-r152x2", parameter="teacher_arch")
    # none | paths or gs:// URIs of a BiT .npz, a .safetensors or PyTorch state dict (.pt/.pth/.bin), or with
    # arch=onnx an .onnx model (N×3×H×W float input, N×classes output, dynamic batch; run by onnxruntime)
    init: str = setting("none", parameter="teacher_init")
    resolution: int = setting(128, parameter="teacher_resolution")
    finetune: bool = setting(
        True, parameter="teacher_finetune"
    )  # false: `init` is already fine-tuned for this dataset's classes
    member_resolutions: str = ""  # ensembles: one resolution per `init` entry (e.g. '384,224'); empty: `resolution`
    # data.labels=none: a file (path or gs:// URI) of the teacher's class names, one a line; empty: from the
    # teacher's own metadata (a funmatch bundle's model.json next to a member file, safetensors metadata)
    classes: str = setting("", hash_omit_default=True)
    stem_pool: str = "zero_pad"  # zero_pad (big_transfer) | neg_inf_pad (big_vision bit_paper)
    # The teacher's input normalization: per-channel mean and std on [0, 1] pixels, comma-separated (e.g.
    # '0.485,0.456,0.406'); our [-1, 1] views are converted to it (models.Normalized). Empty: the model's
    # own: timm:<name> its pretrained_cfg, onnx its metadata_props `mean`/`std` (else [-1, 1]), BiT [-1, 1].
    mean: str = setting("", hash_omit_default=True)
    std: str = setting("", hash_omit_default=True)


@dataclass
class StudentConfig:
    # a name of config/archs.py ARCHS | timm:<name>; every student takes [-1, 1] input (what export documents)
    arch: str = setting("bit-r50x1", parameter="student_arch")
    init: str = "none"  # the paper trains from scratch; else a .npz, .safetensors or .pt/.pth/.bin state dict
    resolution: int = setting(128, parameter="student_resolution")
    stem_pool: str = "zero_pad"
    zero_head: bool = True  # zero-initialised head: first predictions are uniform


@dataclass
class FinetuneConfig:
    """Teacher fine-tuning with BiT-HyperRule; `steps: 0` picks the schedule by train-set size."""

    steps: int = 0
    batch_size: int = 512
    lr: float = 0.003
    momentum: float = 0.9
    mixup_alpha: float = -1.0  # -1: HyperRule (0.1 from 20k train images, else none)


@dataclass
class DistillConfig:
    # fix/rs | fix/cc | fix/ic_ens | ind/rc | ind/ic | same/rc | same/ic | funmatch (aliases: SETUP_ALIASES)
    setup: str = setting("funmatch", parameter="distill_setup")
    # 0: derived from the train-set size (`patient_images`: the paper's shortest budgets, ~10M images seen)
    epochs: float = setting(10000.0, parameter="distill_epochs")
    batch_size: int = setting(512, parameter="distill_batch_size")
    lr: float = setting(0.003, parameter="distill_lr")
    weight_decay: float = setting(
        3e-4, parameter="distill_weight_decay"
    )  # big_vision semantics: scaled by the schedule, not by lr
    temperature: float = setting(10.0, parameter="distill_temperature")
    warmup_steps: int = 1500
    grad_clip_norm: float = 1.0
    optimizer: str = "adam"
    extra_students: str = ""  # more students fed by the same teacher forward: 'arch@res,arch@res'
    crop_min_area: float = 0.05  # inception crop area range (fraction of the image)
    crop_max_area: float = 1.0
    # fix/ic_ens: inception crops averaged per image for the teacher's target (the paper: 1k); left out of
    # the config hash at its default, so adding the key kept every existing hash
    ensemble_crops: int = setting(1000, hash_omit_default=True)
    # at most this many images seen (steps x batch_size), whatever `epochs` gives: how a CPU preset states its
    # wall-clock target (images = minutes x the img/s it measured); 0: no cap. Out of the hash at its default.
    max_images: int = setting(0, hash_omit_default=True)
    # out-of-domain distillation (paper §3.8): the train split's images come from this source (a directory,
    # archive or gs:// prefix of images, labels ignored, or a named dataset's train images) while val/test
    # (labelled) come from data.source; empty: data.source's own train split
    images: str = setting("", hash_omit_default=True)
    log_every: int = setting(50, hashed=False)  # steps between host syncs for logging
    eval_every: int = setting(
        0, hashed=False
    )  # steps between student val evaluations during training; 0: only at the end
    checkpoint_every_steps: int = setting(1000, hashed=False)
    checkpoint_every_minutes: float = setting(10.0, hashed=False)
    keep_checkpoints: int = setting(3, hashed=False)
    num_nodes: int = setting(
        1, hashed=False
    )  # >1: a Kubeflow Trainer TrainJob runs the stage on that many nodes (funmatch/launch/trainjob.py)


@dataclass
class EvalConfig:
    batch_size: int = 256
    crop_pct: float = 0.8  # resize short side to res/crop_pct, centre crop res (128: 160→128)
    minitrain_size: int = 512  # big_vision minitrain: train[:512] (small datasets), train[:2%] (ImageNet)
    on_gpu: bool = False  # run the evaluate stage on the GPU pool (one GPU): ImageNet-size splits, big teachers


@dataclass
class ExportConfig:
    opset: int = 18
    max_abs_diff: float = 1e-3  # onnxruntime vs PyTorch on real test images
    int8: bool = False  # also write model.int8.onnx (static QDQ INT8, onnxruntime; funmatch/stages/quantize.py)
    calibration_images: int = 256  # training images (eval preprocessing) that calibrate the INT8 ranges
    max_int8_drop: float = 0.01  # INT8 test prec@1 may lose at most this much (absolute) or is not published


@dataclass
class GateConfig:
    """Quality gate before export/publish: the student must reach both bars on the test split."""

    min_student_acc: float = 0.0  # absolute student test prec@1
    min_teacher_ratio: float = 0.9  # student test prec@1 / teacher test prec@1
    # data.labels=none (no accuracy to compare): student test agree@1, the fraction of test images where the
    # student's top-1 is the teacher's; 0.9 allows one disagreement in ten, the tolerance min_teacher_ratio gives
    min_agreement: float = 0.9


@dataclass
class ResourcesConfig:
    """Cluster settings of the GPU tasks; kfp.local ignores them."""

    accelerator_type: str = setting("nvidia.com/gpu", parameter="accelerator_type")
    # GPUs of each GPU task (0: a CPU config, no task goes to the GPU pool). A STRING pipeline parameter: the
    # KFP driver reads a resource field fed by a parameter as a string (resolvePodSpecInputRuntimeParameter
    # returns GetStringValue(), "" for a NUMBER), and an empty count drops the GPU limit without a word.
    accelerator_count: int = setting(1, parameter="accelerator_count", parameter_type=str)
    node_selector_key: str = "cloud.google.com/gke-accelerator"
    node_selector_value: str = "nvidia-h100-80gb"
    toleration_key: str = "nvidia.com/gpu"
    shm_size: str = "16Gi"
    timeout_hours: float = 0.0  # one attempt's deadline; 0: derived from the expected budget (task_timeout_hours)
    retries: int = -1  # attempts after the first, each resuming from the checkpoints; -1: derived (task_retries)
    image: str = ""  # registry/name prefix of the images; empty: funmatch's default


@dataclass
class RuntimeConfig:
    device: str = setting("auto", hashed=False)  # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_threads: int = setting(0, hashed=False)  # CPU threads for torch; 0: torch's default
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)
    compile: bool = False  # torch.compile the models (pays off on long GPU runs)
    # torch.compile mode: default | reduce-overhead (CUDA graphs: the step's shapes are static) | max-autotune
    # | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # where torch.compile's artifacts persist (a path or gs:// prefix), so a retry or resume on a fresh node
    # skips recompiling; empty: <checkpoint dir>/compile-cache when distill has a checkpoint dir
    compile_cache: str = setting("", hashed=False)
    checkpoint_dir: str = setting("", hashed=False)  # durable checkpoint location (path or gs://); empty: none
    allow_config_change: bool = setting(False, hashed=False)  # resume from checkpoints made with another config hash
    resident_max_gb: float = setting(
        16.0, hashed=False
    )  # train splits up to this size live on the device as uint8; larger ones stream
    loader_workers: int = setting(
        0, hashed=False
    )  # streamed data: decode processes; 0: this process's CPUs less one (funmatch/data/loader.py)
    jpeg_decode: str = setting(
        "cpu", hashed=False
    )  # streamed jpeg data: cpu (libjpeg-turbo in the workers) | device (nvJPEG on the GPU)
    sync_debug: bool = setting(
        False, hashed=False
    )  # CUDA: warn (with the line) at every host-GPU synchronisation in distill's timed steps


@dataclass
class Expected:
    """What a preset should give, and where that figure comes from."""

    metric: str = ""
    value: float = 0.0  # the student figure (the paper's, or measured for the demo presets)
    teacher_value: float = 0.0  # the teacher figure for the same split
    runtime: str = ""
    paper: str = ""  # source of the figures (table, row)
    train_size: int = 0  # distillation images per epoch in the paper's split
    img_per_s: float = 0.0  # measured distill throughput on one H200 (docs/performance.md, gpu.md)


@dataclass
class Config:
    preset: str = ""
    description: str = ""
    smoke: bool = False  # the preset's tiny variant: same code path on CPU in seconds (see SMOKE)
    expected: Expected = field(default_factory=Expected)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self, *sections: str, everything: bool = False) -> str:
        """Short sha256 of the given sections (all result-relevant ones by default), leaving out the
        keys declared `hashed=False`, so a run can resume with them changed. `everything`: every key of
        the whole config (what lands in a compiled pipeline's IR)."""
        d = self.to_dict()
        if everything:
            kept = d
        else:
            unhashed = {
                k
                for k, f in _fields().items()
                if not f.metadata.get("hashed", True)
                or (f.metadata.get("hash_omit_default") and get(self, k) == f.default)
            }
            sections = sections or ("data", "teacher", "student", "finetune", "distill", "runtime")
            kept = {s: {k: v for k, v in d[s].items() if f"{s}.{k}" not in unhashed} for s in sections}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- keys, types, parsing


def _fields(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key with its dataclass field (type and declared metadata)."""
    out: dict[str, dataclasses.Field] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = f
    return out


def pipeline_parameters() -> dict[str, str]:
    """Pipeline parameter name -> config key, in declaration order: the knobs a user changes in the
    Kubeflow UI, declared on the keys themselves (`setting(parameter=...)`)."""
    return {f.metadata["parameter"]: key for key, f in _fields().items() if f.metadata.get("parameter")}


def pipeline_parameter_types() -> dict[str, type]:
    """Pipeline parameter name -> its type: the key's, or the `parameter_type` declared on it."""
    fields, keys = _fields(), all_keys()
    return {
        name: fields[key].metadata.get("parameter_type") or keys[key] for name, key in pipeline_parameters().items()
    }


def pipeline_defaults(cfg: Config) -> dict[str, Any]:
    """Pipeline parameter name -> `cfg`'s value as that parameter's type (the DAG's defaults)."""
    types = pipeline_parameter_types()
    return {name: types[name](get(cfg, key)) for name, key in pipeline_parameters().items()}


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every dotted leaf key with its type, e.g. {'distill.epochs': float, ...}."""
    out: dict[str, type] = {}
    for name, tp in get_type_hints(cls).items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `funmatch presets --json` for all keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Checks `value` against the field type; ints are accepted where floats are expected."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{key}: expected {names[tp]}, got {value!r}")


def _number(text: str) -> Any:
    """'3' → 3, '1e-3' → 0.001 (YAML 1.1 reads the latter as a string); anything else unchanged."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _parse_scalar(text: str, tp: type) -> Any:
    """A `--set` value as the field type wants it (strings stay verbatim: 'no' is not False)."""
    if tp is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(cfg: Config, key: str, value: Any) -> None:
    types = all_keys()
    if key not in types:
        raise _unknown_key(key)
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, _coerce(key, value, types[key]))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------- presets


def _preset_files() -> dict[str, Any]:
    root = resources.files("funmatch.config.presets")
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(n for n in _preset_files() if not n.startswith("_"))


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    files = _preset_files()
    if name not in files:
        close = difflib.get_close_matches(name, preset_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (available: {', '.join(preset_names())})")
    if name in seen:
        raise ConfigError(f"preset {name!r} inherits itself: {' -> '.join(seen + (name,))}")
    doc = yaml.safe_load(files[name].read_text()) or {}
    merged: dict[str, Any] = {}
    if "base" in doc:
        merged = _read_preset(doc["base"], seen + (name,))
    merged.setdefault("config", {})
    merged["config"].update(_flatten(doc.get("config", {})))
    for k in ("description", "expected"):
        if k in doc:
            merged[k] = doc[k]
    return merged


# `smoke=true`: the preset's own recipe (setup, loss, temperature, lr, wd, optimizer, crops) on the
# bundled data with mini BiT-style models at 32 px for a few dozen steps on the CPU.
SMOKE: dict[str, Any] = {
    "data.source": "demo",
    "data.stored_resolution": 28,
    "teacher.arch": "bit-r14-mini",  # bottleneck blocks, like R152x2: a given BiT .npz can stand in
    "teacher.init": "none",
    "teacher.finetune": True,
    "teacher.resolution": 32,
    "teacher.member_resolutions": "",
    "student.arch": "bit-r14-mini",
    "student.init": "none",
    "student.resolution": 32,
    "finetune.steps": 10,
    "finetune.batch_size": 32,
    "distill.epochs": 0.1,
    "distill.batch_size": 32,
    "distill.warmup_steps": 5,
    "distill.log_every": 5,
    "distill.eval_every": 0,
    "distill.checkpoint_every_steps": 10,
    "eval.batch_size": 256,
    "runtime.device": "cpu",
    "resources.accelerator_count": 0,  # a CPU config: no task goes to the GPU pool
    "gate.min_student_acc": 0.0,
    "gate.min_teacher_ratio": 0.0,
    "gate.min_agreement": 0.0,
    "data.labels": "folders",  # the tiny variant trains its teacher on the labelled demo data,
    "distill.images": "",  # so it distils in-domain
}


def load(preset: str = "demo", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The preset's config with `overrides` (['a.b=v', ...] or {'a.b': v}) applied, validated."""
    doc = _read_preset(preset)
    cfg = Config(preset=preset, description=doc.get("description", ""))
    for k, v in (doc.get("expected") or {}).items():
        _set(cfg, f"expected.{k}", v)
    for k, v in doc["config"].items():
        _set(cfg, k, v)
    apply_overrides(cfg, overrides or [])
    if cfg.smoke:
        apply_overrides(cfg, SMOKE)
        apply_overrides(cfg, overrides or [])  # what the user set explicitly still wins
    _derive_views(cfg)
    _derive_budget(cfg)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    types = all_keys()
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            k = k.strip()
            if k not in types:
                raise _unknown_key(k)
            items.append((k, _parse_scalar(v, types[k])))
    for k, v in items:
        _set(cfg, k, v)
    return cfg


def from_json(text: str) -> Config:
    """The inverse of `Config.to_json` (used by the pipeline components)."""
    d = json.loads(text)
    cfg = Config(preset=d.get("preset", ""), description=d.get("description", ""), smoke=d.get("smoke", False))
    for k, v in _flatten({k: v for k, v in d.items() if k not in ("preset", "description", "smoke")}).items():
        _set(cfg, k, v)
    _derive_views(cfg)
    _derive_budget(cfg)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- task deadlines and retries

# The long tasks (teacher fine-tune, distill, evaluate on the GPU pool) are budgeted from the preset:
#   work_hours = TIMEOUT_MARGIN x gpu_hours
#   timeout_hours = ceil(work_hours + START_HOURS), within [MIN_TIMEOUT_HOURS, MAX_TIMEOUT_HOURS]  (0: derived)
#   retries = max(MIN_RETRIES, attempts - 1 + ceil(work_hours / PREEMPTIBLE_HOURS))              (-1: derived)
#   attempts = ceil(work_hours / (timeout_hours - START_HOURS)): the attempts the work needs, each one resuming
#              from checkpoint_root where the deadline (SIGTERM: checkpoint, exit) stopped the one before
# gpu_hours is the distillation on ONE GPU at the preset's measured rate (`expected.img_per_s`, an H200; more
# GPUs or nodes only finish sooner, and an accelerator_count typed in the UI cannot shorten it). The margin
# covers a slower GPU (the pool is H100), evaluations and checkpoints; START_HOURS each attempt's image pull,
# data copy and compilation; the floor the teacher fine-tune and CPU configs (no rate: demo, smoke variants);
# the ceiling stops a hung attempt within a day. On top of the attempts the work needs, there is one retry per
# PREEMPTIBLE_HOURS of work: a preemptible GKE node lives at most 24 h. So (retries + 1) x timeout covers the
# whole budget. Argo measures a retry window (backoff.maxDuration) from the FIRST attempt's start and gives up
# after it, so `retry_window_s` covers every attempt, each one's wait for a node (NODE_WAIT_HOURS) and every
# backoff. The backoff is constant: Argo reads backoff.factor as an integer and KFP sets no cap, so a doubling
# one would outgrow the run after some twenty retries.
TIMEOUT_MARGIN = 1.5
START_HOURS = 1.0
MIN_TIMEOUT_HOURS = 4.0
MAX_TIMEOUT_HOURS = 24.0
MIN_RETRIES = 5
PREEMPTIBLE_HOURS = 24.0
NODE_WAIT_HOURS = 1.0
RETRY_BACKOFF_S = 120  # before each retry: the pool replaces a preempted node
RETRY_BACKOFF_FACTOR = 1


def gpu_hours(cfg: Config) -> float:
    """Hours the distillation takes on one GPU at the preset's measured rate; 0 for a CPU config or no rate."""
    e = cfg.expected
    if cfg.smoke or cfg.resources.accelerator_count < 1 or not e.img_per_s:
        return 0.0
    return planned_images(cfg) / e.img_per_s / 3600


def task_timeout_hours(cfg: Config) -> float:
    """One attempt's deadline of a long task, derived from the budget (see above)."""
    hours = math.ceil(TIMEOUT_MARGIN * gpu_hours(cfg) + START_HOURS)
    return min(MAX_TIMEOUT_HOURS, max(MIN_TIMEOUT_HOURS, float(hours)))


def task_retries(cfg: Config) -> int:
    """Retries of a long task with its deadline: the attempts the work needs, plus the preemptions."""
    work, timeout = TIMEOUT_MARGIN * gpu_hours(cfg), cfg.resources.timeout_hours
    attempts = max(1, math.ceil(work / max(timeout - START_HOURS, timeout / 2)))  # progress: at least half
    return max(MIN_RETRIES, attempts - 1 + math.ceil(work / PREEMPTIBLE_HOURS))


def retry_window_s(cfg: Config) -> int:
    """A long task's retry window (Argo's backoff.maxDuration, from the first attempt's start): every attempt
    with its wait for a node, and every backoff between them."""
    r = cfg.resources
    backoffs = sum(RETRY_BACKOFF_S * RETRY_BACKOFF_FACTOR**i for i in range(r.retries))
    return math.ceil((r.retries + 1) * (r.timeout_hours + NODE_WAIT_HOURS) * 3600) + backoffs


def _derive_budget(cfg: Config) -> None:
    """`resources.timeout_hours=0`, `resources.retries=-1` (the defaults): what the budget needs."""
    if cfg.resources.timeout_hours == 0:
        cfg.resources.timeout_hours = task_timeout_hours(cfg)
    if cfg.resources.retries == -1 and cfg.resources.timeout_hours > 0:
        cfg.resources.retries = task_retries(cfg)


# ---------------------------------------------------------------- derived defaults (user folders)

# distill.epochs=0: patience by train-set size. The paper's shortest budgets (Table 4; big_vision
# configs/proj/distill/bigsweep_flowers_pet.py and bigsweep_food_sun.py, variant=fast) all show the student some
# ten million images whatever the dataset's size: Flowers102 (1,020 train images) 10,000 epochs = 10.2M, Pets
# (3,312) 1,000-3,000 epochs = 3.3-9.9M, Food101 (68k) and SUN397 (76k) 100 epochs = 6.8-7.6M. So the derived
# budget is PATIENT_IMAGES images seen, kept within [MIN_EPOCHS, MAX_EPOCHS] epochs (no set gets fewer than the
# 100 epochs the paper calls "much worse"; the smallest, Flowers, gets its 10,000), then `distill.max_images`
# caps it: a CPU preset's wall-clock target, stated as the images its measured img/s gets through in that time.
# BiT-HyperRule scales the teacher the same way, by size bucket (recipe/optim.py `hyperrule`).
PATIENT_IMAGES = 10_000_000
MIN_EPOCHS, MAX_EPOCHS = 100.0, 10_000.0
# data.stored_resolution=0: the canvas side that serves the largest view. The canvas holds each image whole,
# its long side on the canvas side (letterboxed), so an image of aspect a = long/short keeps a short side of
# side/a. The most demanding view is the evaluation (and teacher fine-tuning) view, whose short side is resized
# to res/eval.crop_pct before the central res crop (inception crops are at most the short side, res after the
# resize). So side = ceil(STORED_ASPECT x largest view / eval.crop_pct), rounded up to a multiple of 8, holds
# every image up to 4:3 (a photograph's usual frame, and the inception crop's widest ratio) without upsampling
# its views; a wider image's eval view is upsampled by (aspect / (4/3)).
STORED_ASPECT = 4 / 3


def patient_epochs(train_size: int) -> float:
    """distill.epochs=0: PATIENT_IMAGES images seen, within [MIN_EPOCHS, MAX_EPOCHS] epochs of `train_size`."""
    return min(MAX_EPOCHS, max(MIN_EPOCHS, PATIENT_IMAGES / max(1, train_size)))


@dataclass(frozen=True)
class Budget:
    """The distillation's schedule for a train split: steps, warmup, the epochs they make, and how."""

    steps: int
    warmup: int
    epochs: float  # steps x batch / train size (what was run, derived or given)
    how: str  # one line: where the steps come from


def distill_budget(k: DistillConfig, train_size: int) -> Budget:
    """The steps of a distillation on `train_size` images: ceil(epochs x n / batch) with `distill.epochs`, or
    `patient_epochs` when it is 0; then at most `distill.max_images` / batch. A derived or capped budget keeps
    its warmup under a tenth of its steps; a given one keeps `warmup_steps` (distill refuses one too long)."""
    n, batch = max(1, train_size), k.batch_size
    derived = k.epochs == 0
    epochs = patient_epochs(n) if derived else k.epochs
    steps = max(1, math.ceil(epochs * n / batch))
    how = (
        f"derived from {n} train images (distill.epochs=0): {PATIENT_IMAGES:,} images seen within "
        f"[{MIN_EPOCHS:g}, {MAX_EPOCHS:g}] epochs = {epochs:.4g} epochs"
        if derived
        else f"distill.epochs={k.epochs:g}"
    )
    capped = bool(k.max_images) and steps * batch > k.max_images
    if capped:
        steps = max(1, k.max_images // batch)
        how += f", capped by distill.max_images={k.max_images:,}"
    warmup = min(k.warmup_steps, steps // 10) if derived or capped else k.warmup_steps
    return Budget(steps, warmup, steps * batch / n, how)


def stored_side(cfg: Config) -> int:
    """data.stored_resolution=0: ceil(STORED_ASPECT x the largest view / eval.crop_pct), a multiple of 8."""
    views = [
        cfg.teacher.resolution,
        cfg.student.resolution,
        *member_resolutions(cfg.teacher),
        *(res for _, res in extra_students(cfg.distill)),
    ]
    side = math.ceil(STORED_ASPECT * max(views) / cfg.eval.crop_pct)
    return -(-side // 8) * 8


def _derive_views(cfg: Config) -> None:
    """`data.stored_resolution=0`: the side `stored_side` gives (the config then records it)."""
    if cfg.data.stored_resolution == 0:
        cfg.data.stored_resolution = stored_side(cfg)


SMALL_TRAIN = 20_000  # BiT-HyperRule's smallest size bucket (recipe/optim.py `hyperrule`)


def scratch_teacher_note(cfg: Config, train_size: int | None = None) -> str:
    """One line when the teacher is trained from scratch (teacher.init=none, teacher.finetune=true) on a small
    train split (`train_size` below SMALL_TRAIN; None: not known yet): the recipe fine-tunes a pretrained
    teacher (BiT-M R152x2), and the student can only copy the teacher it is given. Empty otherwise."""
    t = cfg.teacher
    if split_uris(t.init) or not t.finetune or (train_size is not None and train_size >= SMALL_TRAIN):
        return ""
    images = f" on {train_size} images" if train_size is not None else ""
    return (
        f"the teacher ({t.arch}) is trained from scratch{images} (teacher.init=none), but the recipe assumes a "
        "pretrained teacher and the student only copies it: pass one with --set teacher.init=<file> "
        "teacher.finetune=false (a model already trained on these classes), or a BiT .npz with teacher.finetune=true"
    )


NAMED_SOURCES = ("demo", "flowers102", "pets", "food101", "sun397", "imagenet")  # data.source values, not paths
DEFAULT_PRESET, FOLDER_PRESET = "demo", "folder"


def default_preset(overrides: list[str]) -> tuple[str, str]:
    """The preset a command takes without `--preset`, and one line saying why (empty for the demo): `folder`
    when `--set data.source=...` names the user's own images (neither demo nor a named dataset), else `demo`."""
    source = ""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "data.source":
            source = value.strip()
    if source and source not in NAMED_SOURCES:
        return FOLDER_PRESET, (
            f"preset {FOLDER_PRESET} (data.source={source} is your own images: {FOLDER_PRESET}'s views, stored "
            f"resolution and distillation budget suit them and derive from them; --preset {DEFAULT_PRESET} keeps "
            "the demo's settings)"
        )
    return DEFAULT_PRESET, ""


def planned_images(cfg: Config) -> float:
    """Images the distillation shows on the preset's own train split (`expected.train_size`)."""
    k, n = cfg.distill, cfg.expected.train_size
    images = (k.epochs or patient_epochs(n)) * n
    return min(images, k.max_images) if k.max_images else images


# ---------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def validate(cfg: Config) -> None:
    """Checks every value that can be checked without reading data or weights."""

    d, t, s, f, k = cfg.data, cfg.teacher, cfg.student, cfg.finetune, cfg.distill
    _check(d.source.strip() != "", "data.source", d.source, "'demo', a directory or a gs:// prefix")
    _check(
        d.stored_resolution > 0,
        "data.stored_resolution",
        d.stored_resolution,
        "a positive integer (0 in a preset or --set: derived from the model views)",
    )
    for key, v in (("data.val_fraction", d.val_fraction), ("data.test_fraction", d.test_fraction)):
        _check(0 <= v < 1, key, v, "a fraction in [0, 1)")
    _check(
        d.val_fraction + d.test_fraction < 1,
        "data.val_fraction",
        d.val_fraction,
        f"val_fraction + test_fraction < 1 (test_fraction={d.test_fraction})",
    )
    _check(d.shard_size > 0, "data.shard_size", d.shard_size, "a positive integer")
    _check(
        d.max_train_per_class >= 0, "data.max_train_per_class", d.max_train_per_class, "0 (all) or a positive integer"
    )
    _check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "a fraction in [0, 1]")
    _check(d.encoding in ("raw", "jpeg"), "data.encoding", d.encoding, "raw or jpeg")
    _check(1 <= d.jpeg_quality <= 100, "data.jpeg_quality", d.jpeg_quality, "an integer in [1, 100]")
    _check(d.max_image_pixels > 0, "data.max_image_pixels", d.max_image_pixels, "a positive integer")
    _check(d.labels in LABELS, "data.labels", d.labels, f"one of {', '.join(LABELS)}")

    for role, m in (("teacher", t), ("student", s)):
        archs.check_arch(f"{role}.arch", m.arch)
        archs.check_resolution(f"{role}.resolution", m.arch, m.resolution)
        _check(m.stem_pool in STEM_POOLS, f"{role}.stem_pool", m.stem_pool, f"one of {', '.join(STEM_POOLS)}")
        onnx = m.arch == archs.ONNX
        for uri in split_uris(m.init):
            _check(
                uri.endswith(".onnx") if onnx else uri.endswith(archs.WEIGHT_SUFFIXES),
                f"{role}.init",
                m.init,
                "'none' or paths / gs:// URIs ending in .onnx (teacher.arch=onnx), comma-separated"
                if onnx
                else f"'none' or paths / gs:// URIs ending in {', '.join(archs.WEIGHT_SUFFIXES)}, comma-separated"
                + (" (or .onnx with teacher.arch=onnx)" if role == "teacher" else ""),
            )
    _check(s.arch != archs.ONNX, "student.arch", s.arch, "a trainable architecture (onnx is for given teachers)")
    _check(
        t.arch != archs.ONNX or (bool(split_uris(t.init)) and not t.finetune),
        "teacher.arch",
        t.arch,
        "onnx only with teacher.init=<.onnx files> and teacher.finetune=false (an ONNX teacher runs as given)",
    )
    for key, value in (("teacher.mean", t.mean), ("teacher.std", t.std)):
        channel_stats(key, value)
    _check(len(split_uris(s.init)) <= 1, "student.init", s.init, "'none' or a single checkpoint")
    resolutions = member_resolutions(t)
    _check(
        len(resolutions) == max(1, len(split_uris(t.init))),
        "teacher.member_resolutions",
        t.member_resolutions,
        f"empty or one resolution per teacher.init entry ({len(split_uris(t.init))})",
    )
    for res in resolutions:
        archs.check_resolution("teacher.member_resolutions", t.arch, res)
    _check(d.source != "demo" or not d.root, "data.root", d.root, "empty when data.source is 'demo'")
    _check(
        t.finetune or bool(split_uris(t.init)),
        "teacher.finetune",
        t.finetune,
        "true when teacher.init is 'none' (a teacher must be trained or given)",
    )
    _check(
        not t.finetune or len(split_uris(t.init)) <= 1,
        "teacher.init",
        t.init,
        "a single checkpoint when teacher.finetune is true (ensembles are given already fine-tuned)",
    )

    for key, value, unlabelled_train in (
        ("data.labels", d.labels, d.labels == "none"),
        ("distill.images", k.images, bool(k.images)),
    ):
        _check(
            not unlabelled_train or (not t.finetune and bool(split_uris(t.init))),
            key,
            value,
            "a given teacher (teacher.init=<checkpoint> and teacher.finetune=false): the train images have no "
            "labels to fine-tune on",
        )
    _check(
        not (k.images and d.labels == "none"),
        "distill.images",
        k.images,
        "empty when data.labels=none (data.source already is the unlabelled images)",
    )
    _check(
        not (cfg.export.int8 and d.labels == "none"),
        "export.int8",
        cfg.export.int8,
        "false when data.labels=none (the INT8 check measures test prec@1, which needs labels)",
    )

    _check(f.steps >= 0, "finetune.steps", f.steps, "0 (BiT-HyperRule) or a positive number of steps")
    _check(f.batch_size > 0, "finetune.batch_size", f.batch_size, "a positive integer")
    _check(f.lr > 0, "finetune.lr", f.lr, "a positive number")
    _check(0 <= f.momentum < 1, "finetune.momentum", f.momentum, "a number in [0, 1)")
    _check(
        f.mixup_alpha == -1 or f.mixup_alpha >= 0,
        "finetune.mixup_alpha",
        f.mixup_alpha,
        "-1 (HyperRule) or a non-negative number",
    )

    _check(
        k.setup in VARIANTS or k.setup in SETUP_ALIASES,
        "distill.setup",
        k.setup,
        f"one of {', '.join(VARIANTS)} (or the aliases {', '.join(f'{a}={v}' for a, v in SETUP_ALIASES.items())})",
    )
    _check(k.ensemble_crops > 0, "distill.ensemble_crops", k.ensemble_crops, "a positive integer")
    _check(k.epochs >= 0, "distill.epochs", k.epochs, "0 (derived from the train-set size) or a positive number")
    _check(k.max_images >= 0, "distill.max_images", k.max_images, "0 (no cap) or a positive number of images")
    _check(k.batch_size > 0, "distill.batch_size", k.batch_size, "a positive integer")
    _check(k.lr > 0, "distill.lr", k.lr, "a positive number")
    _check(k.weight_decay >= 0, "distill.weight_decay", k.weight_decay, "a non-negative number")
    _check(k.temperature > 0, "distill.temperature", k.temperature, "a positive number")
    _check(k.warmup_steps >= 0, "distill.warmup_steps", k.warmup_steps, "a non-negative integer")
    _check(k.grad_clip_norm > 0, "distill.grad_clip_norm", k.grad_clip_norm, "a positive number")
    _check(k.optimizer in OPTIMIZERS, "distill.optimizer", k.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    for i, (arch, res) in enumerate(extra_students(k)):
        archs.check_arch(f"distill.extra_students[{i}]", arch)
        _check(arch != archs.ONNX, f"distill.extra_students[{i}]", arch, "a trainable architecture, not onnx")
        archs.check_resolution(f"distill.extra_students[{i}]", arch, res)
    _check(
        0 < k.crop_min_area <= k.crop_max_area <= 1,
        "distill.crop_min_area",
        k.crop_min_area,
        f"0 < crop_min_area <= crop_max_area <= 1 (crop_max_area={k.crop_max_area})",
    )
    _check(k.log_every > 0, "distill.log_every", k.log_every, "a positive integer")
    _check(k.eval_every >= 0, "distill.eval_every", k.eval_every, "a non-negative integer")
    _check(
        k.checkpoint_every_steps > 0, "distill.checkpoint_every_steps", k.checkpoint_every_steps, "a positive integer"
    )
    _check(
        k.checkpoint_every_minutes > 0,
        "distill.checkpoint_every_minutes",
        k.checkpoint_every_minutes,
        "a positive number",
    )
    _check(k.keep_checkpoints >= 1, "distill.keep_checkpoints", k.keep_checkpoints, "at least 1")
    _check(k.num_nodes >= 1, "distill.num_nodes", k.num_nodes, "a positive integer (>1: a TrainJob on that many nodes)")

    _check(cfg.eval.batch_size > 0, "eval.batch_size", cfg.eval.batch_size, "a positive integer")
    _check(0 < cfg.eval.crop_pct <= 1, "eval.crop_pct", cfg.eval.crop_pct, "a fraction in (0, 1]")
    _check(cfg.eval.minitrain_size >= 0, "eval.minitrain_size", cfg.eval.minitrain_size, "a non-negative integer")
    _check(cfg.export.opset >= 17, "export.opset", cfg.export.opset, "17 or higher")
    _check(cfg.export.max_abs_diff > 0, "export.max_abs_diff", cfg.export.max_abs_diff, "a positive number")
    _check(
        cfg.export.calibration_images > 0,
        "export.calibration_images",
        cfg.export.calibration_images,
        "a positive integer",
    )
    _check(
        0 <= cfg.export.max_int8_drop <= 1,
        "export.max_int8_drop",
        cfg.export.max_int8_drop,
        "a fraction in [0, 1] (0.01 = one point of prec@1)",
    )

    _check(0 <= cfg.gate.min_student_acc <= 1, "gate.min_student_acc", cfg.gate.min_student_acc, "a fraction in [0, 1]")
    _check(
        cfg.gate.min_teacher_ratio >= 0, "gate.min_teacher_ratio", cfg.gate.min_teacher_ratio, "a non-negative ratio"
    )
    _check(0 <= cfg.gate.min_agreement <= 1, "gate.min_agreement", cfg.gate.min_agreement, "a fraction in [0, 1]")
    r = cfg.resources
    _check(
        r.accelerator_count >= 0,
        "resources.accelerator_count",
        r.accelerator_count,
        "a non-negative integer (0: CPU only, no task on the GPU pool)",
    )
    _check(
        r.accelerator_count == 0 or r.accelerator_type.strip() != "",
        "resources.accelerator_type",
        r.accelerator_type,
        f"a resource name such as nvidia.com/gpu (resources.accelerator_count={r.accelerator_count})",
    )
    _check(
        r.timeout_hours > 0,
        "resources.timeout_hours",
        r.timeout_hours,
        "a positive number of hours (0 in a preset or --set: derived from the expected budget)",
    )
    _check(
        r.retries >= 0,
        "resources.retries",
        r.retries,
        "a non-negative integer (-1 in a preset or --set: derived from the expected budget)",
    )
    _check(
        bool(re.fullmatch(r"[0-9]+(\.[0-9]+)?([KMGT]i?)?", r.shm_size)),
        "resources.shm_size",
        r.shm_size,
        "a Kubernetes quantity such as 16Gi",
    )
    rt = cfg.runtime
    _check(
        bool(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", rt.device)),
        "runtime.device",
        rt.device,
        "auto, cpu, cuda or cuda:N",
    )
    _check(rt.num_threads >= 0, "runtime.num_threads", rt.num_threads, "a non-negative integer")
    _check(rt.resident_max_gb >= 0, "runtime.resident_max_gb", rt.resident_max_gb, "a non-negative number of GiB")
    _check(rt.loader_workers >= 0, "runtime.loader_workers", rt.loader_workers, "0 (auto) or a positive integer")
    _check(rt.jpeg_decode in JPEG_DECODERS, "runtime.jpeg_decode", rt.jpeg_decode, f"one of {', '.join(JPEG_DECODERS)}")
    _check(
        rt.compile_mode in COMPILE_MODES, "runtime.compile_mode", rt.compile_mode, f"one of {', '.join(COMPILE_MODES)}"
    )
    _check(rt.precision in PRECISIONS, "runtime.precision", rt.precision, f"one of {', '.join(PRECISIONS)}")


def extra_students(k: DistillConfig) -> list[tuple[str, int]]:
    """distill.extra_students 'bit-r50x1@160,mobilenetv3-large-gn@224' → [(arch, res), ...]."""
    out = []
    for item in filter(None, (i.strip() for i in k.extra_students.split(","))):
        arch, _, res = item.partition("@")
        if not res.isdigit():
            raise ConfigError(
                f"distill.extra_students={k.extra_students!r} is not allowed: expected "
                "comma-separated ARCH@RESOLUTION entries such as 'bit-r50x1@160'"
            )
        out.append((arch, int(res)))
    return out


def member_resolutions(teacher: TeacherConfig) -> list[int]:
    """The resolution of each teacher in the ensemble."""
    if not teacher.member_resolutions.strip():
        return [teacher.resolution] * max(1, len(split_uris(teacher.init)))
    try:
        return [int(r) for r in teacher.member_resolutions.split(",")]
    except ValueError:
        raise ConfigError(
            f"teacher.member_resolutions={teacher.member_resolutions!r} is not allowed: "
            "expected comma-separated integers such as '384,224'"
        ) from None


def channel_stats(key: str, value: str) -> tuple[float, float, float] | None:
    """teacher.mean / teacher.std '0.485,0.456,0.406' → three floats (one value: all channels); '' → None."""
    if not value.strip():
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        parts = []
    ok = len(parts) in (1, 3) and all(math.isfinite(v) for v in parts) and (key.endswith("mean") or min(parts) > 0)
    if not ok:
        raise ConfigError(
            f"{key}={value!r} is not allowed: expected 3 comma-separated numbers (one per RGB channel, on [0, 1] "
            f"pixels) such as '{'0.485,0.456,0.406' if key.endswith('mean') else '0.229,0.224,0.225'}'"
            + ("" if key.endswith("mean") else ", each > 0")
        )
    r, g, b = parts * 3 if len(parts) == 1 else parts
    return r, g, b


def split_uris(init: str) -> list[str]:
    """'none' → []; 'a.npz, b.npz' → ['a.npz', 'b.npz']."""
    if init.strip().lower() in ("", "none"):
        return []
    return [u.strip() for u in init.split(",") if u.strip()]


def describe_presets() -> dict[str, dict[str, Any]]:
    """Every preset's description, expectation and fully resolved config (for `presets --json`)."""
    out = {}
    for name in preset_names():
        cfg = load(name)
        e, hours = cfg.expected, gpu_hours(cfg)
        out[name] = {
            "description": cfg.description,
            "expected": dataclasses.asdict(e),
            "images_processed": planned_images(cfg),
            "gpu_hours": round(hours, 2) if hours else None,
            "smoke": f"funmatch run --preset {name} --set smoke=true",
            "config": cfg.to_dict(),
        }
    return out
