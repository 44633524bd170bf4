"""Teachers the way users bring them: a timm architecture by name with a .safetensors or .pt state dict,
or an .onnx file, distilled on the bundled data (a timm student through export); each bad file answered
with one line before any compute (funmatch.recipe.models, funmatch.stages.finetune.given_teacher)."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from test_bit_npz import _big_transfer, _randomized, _to_big_vision, _write
from torch import nn

from funmatch import config
from funmatch.app import cli
from funmatch.errors import CheckpointError, ConfigError
from funmatch.recipe import models
from funmatch.stages import distill, export, finetune

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def timm_model(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model(f"timm:{name}", num_classes, zero_head=False).eval()


def export_onnx(
    model: nn.Module, path, example: torch.Tensor, *, dynamic: bool = True, metadata: dict[str, str] | None = None
) -> str:
    """`model` written by torch.onnx.export (dynamo, opset 18, dynamic batch unless `dynamic=False`), with
    `metadata` as the file's metadata_props."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None,
        )
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))
    return str(path)


class TinyConvNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_timm_architecture_by_name_loads_safetensors_and_state_dicts(tmp_path):
    source = timm_model("mobilenetv3_small_050", 5)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "t.safetensors"))
    torch.save(source.state_dict(), tmp_path / "t.pt")
    x = torch.randn(2, 3, 32, 32)
    for name in ("t.safetensors", "t.pt"):
        model = models.create_model("timm:mobilenetv3_small_050", 5)
        models.load_init(model, "timm:mobilenetv3_small_050", str(tmp_path / name), load_head=True)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), source(x))
    narrow = models.create_model("timm:mobilenetv3_small_050", 3)
    with pytest.raises(CheckpointError, match=r"does not fit timm:mobilenetv3_small_050 with 3 classes.*only the head"):
        models.load_init(narrow, "timm:mobilenetv3_small_050", str(tmp_path / "t.pt"), load_head=True)
    other = models.create_model("timm:resnet10t", 5)
    with pytest.raises(CheckpointError, match=r"does not fit timm:resnet10t.*missing"):
        models.load_init(other, "timm:resnet10t", str(tmp_path / "t.safetensors"), load_head=True)


def test_normalized_feeds_the_model_its_own_normalization():
    model = timm_model("resnet10t", 4)
    norm = models.normalization("timm:resnet10t", model, None, None)
    assert norm == IMAGENET | {"source": "timm pretrained_cfg"}
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # our [-1, 1] view
    mean, std = torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1), torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(models.normalized(model, norm)(x), model(((x + 1) / 2 - mean) / std))
    override = models.normalization("timm:resnet10t", model, (0.5, 0.5, 0.5), None)
    assert override["mean"] == [0.5] * 3 and override["std"] == IMAGENET["std"]
    assert override["source"] == "teacher.mean + timm pretrained_cfg"
    bit = models.create_model("bit-r14-mini", 4)
    assert models.normalization("bit-r14-mini", bit, None, None) == models.VALUE_RANGE | {"source": "[-1, 1]"}
    assert models.normalized(bit, models.VALUE_RANGE) is bit  # BiT's native range: no wrapper


def test_onnx_teacher_matches_the_torch_model(tmp_path):
    source = timm_model("resnet10t", 10)
    path = export_onnx(
        source,
        tmp_path / "t.onnx",
        torch.zeros(2, 3, 32, 32),
        metadata={"mean": "0.5,0.4,0.3", "std": "[0.2, 0.25, 0.3]"},
    )
    teacher = models.load_onnx(path)
    assert teacher.stats == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]} and teacher.resolution == 32
    teacher.check(10, 32, "teacher.resolution")
    with pytest.raises(
        CheckpointError, match="takes 32x32 images, not teacher.resolution=64; set teacher.resolution=32"
    ):
        teacher.check(10, 64, "teacher.resolution")
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source(x), atol=1e-4, rtol=1e-4)
    norm = models.normalization("onnx", teacher, None, None)
    assert norm["source"] == "onnx metadata_props" and norm["std"] == [0.2, 0.25, 0.3]


def test_onnx_that_is_not_an_image_classifier_is_refused(tmp_path):
    vector = export_onnx(nn.Linear(12, 10), tmp_path / "vector.onnx", torch.zeros(2, 12))
    with pytest.raises(CheckpointError, match=r"vector.onnx takes pixels: tensor\(float\).*expected one float32 image"):
        models.load_onnx(vector)
    fixed = export_onnx(TinyConvNet(), tmp_path / "fixed.onnx", torch.zeros(2, 3, 32, 32), dynamic=False)
    with pytest.raises(CheckpointError, match="batches of exactly 2 images; export it with a dynamic batch axis"):
        models.load_onnx(fixed)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07not a model" * 40)
    with pytest.raises(CheckpointError, match="junk.onnx: not a readable ONNX model"):
        models.load_onnx(str(tmp_path / "junk.onnx"))
    odd = export_onnx(TinyConvNet(), tmp_path / "odd.onnx", torch.zeros(2, 3, 32, 32), metadata={"mean": "a,b,c"})
    with pytest.raises(CheckpointError, match="odd.onnx metadata_props mean='a,b,c' is not allowed: expected 3"):
        models.load_onnx(odd)
    seven = models.load_onnx(export_onnx(TinyConvNet(7), tmp_path / "seven.onnx", torch.zeros(2, 3, 32, 32)))
    with pytest.raises(CheckpointError, match=r"seven.onnx returns \(7,\) logits per image; the data has 10 classes"):
        seven.check(10, 32, "teacher.resolution")


def test_unreadable_state_dicts_are_one_line_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"conv.weight": Payload()}, tmp_path / "pickled.pt")
    torch.save(TinyConvNet(), tmp_path / "whole.pth")  # torch.save(model): needs the class to load
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02garbage" * 30)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage" * 30)
    for name, message in (
        ("pickled.pt", "needs full unpickling"),
        ("whole.pth", "save model.state_dict()"),
        ("junk.bin", "not a readable PyTorch state dict"),
        ("junk.safetensors", "not a readable .safetensors file"),
    ):
        with pytest.raises(CheckpointError, match=message) as refused:
            models.read_state_dict(str(tmp_path / name))
        assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_training_checkpoints_of_tensors_give_their_model_weights(tmp_path):
    """timm's train.py / DDP layouts: {'state_dict': ..., 'state_dict_ema': ...}, 'module.' prefixes."""
    weights = TinyConvNet().state_dict()
    ema = {k: v + 1 for k, v in weights.items()}
    torch.save({"epoch": torch.tensor(3), "state_dict": weights, "state_dict_ema": ema}, tmp_path / "ckpt.pth")
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ddp.pt")
    got = models.read_state_dict(str(tmp_path / "ckpt.pth"))
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)  # EMA first, as timm
    got = models.read_state_dict(str(tmp_path / "ddp.pt"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)


def test_config_checks_timm_names_and_onnx_teachers():
    with pytest.raises(
        ConfigError, match=r"teacher.arch='timm:resnet10' is not a timm architecture; did you mean timm:resnet10t"
    ):
        config.load("demo-tiny", ["teacher.arch=timm:resnet10"])
    with pytest.raises(
        ConfigError, match="student.resolution=32 is not allowed: timm:vit_tiny_patch16_224 takes only 224x224"
    ):
        config.load("demo-tiny", ["student.arch=timm:vit_tiny_patch16_224"])
    with pytest.raises(ConfigError, match=r"teacher.init=.*\(or .onnx with teacher.arch=onnx\)"):
        config.load("demo-tiny", ["teacher.init=/m/t.onnx", "teacher.finetune=false"])
    with pytest.raises(ConfigError, match="teacher.arch='onnx' is not allowed: expected onnx only with"):
        config.load("demo-tiny", ["teacher.arch=onnx", "teacher.init=/m/t.onnx"])  # an ONNX model is not fine-tuned
    with pytest.raises(ConfigError, match="student.arch='onnx'"):
        config.load("demo-tiny", ["student.arch=onnx"])
    with pytest.raises(ConfigError, match=r"distill.extra_students\[0\]='onnx'"):
        config.load("demo-tiny", ["distill.extra_students=onnx@32"])
    with pytest.raises(ConfigError, match="teacher.std='0.2,0,0.2' is not allowed"):
        config.load("demo-tiny", ["teacher.std=0.2,0,0.2"])
    cfg = config.load("demo-tiny", ["teacher.arch=onnx", "teacher.init=/m/t.onnx", "teacher.finetune=false"])
    assert cfg.teacher.arch == "onnx"
    assert config.load("demo-tiny").hash() == config.load("demo-tiny", ["teacher.mean=", "teacher.std="]).hash()


@pytest.mark.parametrize(
    "arch, make, words",
    [
        ("timm:resnet10t", lambda p: torch.save(TinyConvNet(), p / "t.pt"), ["t.pt", "needs full unpickling"]),
        ("timm:resnet10t", lambda p: (p / "t.pt").write_bytes(b"PK\x03\x04 truncated"), ["not a readable"]),
        ("onnx", lambda p: export_onnx(nn.Linear(12, 3), p / "t.onnx", torch.zeros(2, 12)), ["N×3×H×W"]),
    ],
)
def test_cli_refuses_bad_teacher_files_in_one_line(tmp_path, capsys, arch, make, words):
    make(tmp_path)
    (init,) = [p for p in tmp_path.iterdir() if p.suffix in (".pt", ".onnx")]
    argv = ["run", "--preset", "demo-tiny", "--output", str(tmp_path / "run")]
    argv += ["--set", f"teacher.arch={arch}", "--set", f"teacher.init={init}", "--set", "teacher.finetune=false"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert all(w in err for w in words)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- distilling from them (demo-tiny, CPU)

FAST = ["teacher.finetune=false", "distill.epochs=0.01", "distill.warmup_steps=1", "distill.eval_every=0"]
FAST += ["distill.batch_size=32"]  # 3 steps


def _distil(tmp_path, dataset_dir, overrides):
    cfg = config.load("demo-tiny", FAST + overrides)
    teacher = finetune.given_teacher(cfg, dataset_dir, tmp_path / "teacher")
    student = distill.run(cfg, dataset_dir, tmp_path / "teacher", tmp_path / "student")
    assert student["steps"] == 3 and student["teacher"] == cfg.teacher.arch
    card = json.loads((tmp_path / "student" / "model.json").read_text())
    assert card["stem_pool"] == "zero_pad"  # the student records its padding too
    return cfg, teacher


def _imagenet_normalized(model, x):
    mean, std = torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1), torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(((x + 1) / 2 - mean) / std)


def test_timm_teacher_from_safetensors(tmp_path, dataset_dir):
    source = timm_model("resnet10t", 10)
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    _, info = _distil(tmp_path, dataset_dir, ["teacher.arch=timm:resnet10t", f"teacher.init={weights}"])
    assert info["normalization"] == [IMAGENET | {"source": "timm pretrained_cfg"}] and info["runtime"] == "torch"
    (teacher,), card = models.load_bundle(tmp_path / "teacher")
    assert card["stem_pool"] == "zero_pad" and card["normalization"] == info["normalization"]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # the bundle's teacher takes [-1, 1] views and feeds timm's normalization
        torch.testing.assert_close(teacher(x), _imagenet_normalized(source, x))


@pytest.mark.slow
def test_state_dict_teacher_and_a_timm_student_through_export(tmp_path, dataset_dir):
    weights = tmp_path / "teacher.pt"
    torch.save(timm_model("mobilenetv3_small_050", 10).state_dict(), weights)
    teacher = ["teacher.arch=timm:mobilenetv3_small_050", f"teacher.init={weights}"]
    teacher += ["teacher.mean=0.5,0.5,0.5", "teacher.std=0.25"]
    cfg, info = _distil(tmp_path, dataset_dir, [*teacher, "student.arch=timm:test_resnet"])
    assert info["normalization"][0] == {"mean": [0.5] * 3, "std": [0.25] * 3, "source": "teacher.mean/std"}
    exported = export.run(cfg, dataset_dir, tmp_path / "student", {}, tmp_path / "export")
    assert exported.metrics["export/onnx_max_abs_diff"] <= cfg.export.max_abs_diff
    assert exported.card["student"]["arch"] == "timm:test_resnet"
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((3, 3, 32, 32), np.float32)})[0].shape == (3, 10)


def test_onnx_teacher(tmp_path, dataset_dir):
    source = timm_model("resnet10t", 10)
    stats = {"mean": ",".join(map(str, IMAGENET["mean"])), "std": ",".join(map(str, IMAGENET["std"]))}
    path = export_onnx(source, tmp_path / "t.onnx", torch.zeros(2, 3, 32, 32), metadata=stats)
    _, info = _distil(tmp_path, dataset_dir, ["teacher.arch=onnx", f"teacher.init={path}"])
    assert info["runtime"] == "onnxruntime" and info["normalization"][0]["source"] == "onnx metadata_props"
    (teacher,), card = models.load_bundle(tmp_path / "teacher")
    assert card["members"] == ["member-0.onnx"]  # the model travels inside the artifact
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(teacher(x), _imagenet_normalized(source, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["safetensors", "onnx"])
def test_teacher_for_another_number_of_classes_is_refused(tmp_path, dataset_dir, kind):
    if kind == "onnx":
        init, arch = export_onnx(TinyConvNet(7), tmp_path / "t.onnx", torch.zeros(2, 3, 32, 32)), "onnx"
    else:
        init, arch = str(tmp_path / "t.safetensors"), "timm:mobilenetv3_small_050"
        source = timm_model("mobilenetv3_small_050", 7)
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, init)
    cfg = config.load("demo-tiny", [*FAST, f"teacher.arch={arch}", f"teacher.init={init}"])
    with pytest.raises(CheckpointError, match="10 classes") as refused:
        finetune.given_teacher(cfg, dataset_dir, tmp_path / "teacher")
    assert "\n" not in str(refused.value) and not (tmp_path / "teacher").exists()


def test_every_paper_preset_records_its_teachers_padding(tmp_path, dataset_dir):
    """The paper presets take the released teachers as given; a big_vision-layout file stands in for each
    (the preset's smoke variant, its teacher given): the artifact records bit_paper's -inf padding and
    BiT's own [-1, 1] input."""
    bv = _write(tmp_path / "bv.npz", _to_big_vision(_big_transfer(_randomized("bit-r14-mini", 10, "neg_inf_pad"))))
    paper = [n for n in config.preset_names() if config.load(n).teacher.init.startswith("gs://bit_models/")]
    assert len(paper) >= 16 and not any(config.load(n).teacher.finetune for n in paper)
    for name in paper:
        cfg = config.load(name, ["smoke=true", f"teacher.init={bv}", "teacher.finetune=false"])
        info = finetune.given_teacher(cfg, dataset_dir, tmp_path / name)
        card = json.loads((tmp_path / name / "model.json").read_text())
        assert info["stem_pool"] == card["stem_pool"] == "neg_inf_pad", name
        assert card["normalization"] == [models.VALUE_RANGE | {"source": "[-1, 1]"}], name


def test_finetuning_a_timm_teacher_trains_it_behind_its_normalization(tmp_path, dataset_dir):
    """teacher.finetune=true from a state dict for other classes: the body loads, the head is new, and the
    artifact records (and load_bundle applies) the normalization it was trained behind."""
    body = tmp_path / "body.pt"
    torch.save(timm_model("mobilenetv3_small_050", 1000).state_dict(), body)
    overrides = ["teacher.arch=timm:mobilenetv3_small_050", f"teacher.init={body}", "finetune.steps=2"]
    info = finetune.run(config.load("demo-tiny", overrides), dataset_dir, tmp_path / "tuned")
    assert info["steps"] == 2 and info["normalization"] == [IMAGENET | {"source": "timm pretrained_cfg"}]
    (teacher,), card = models.load_bundle(tmp_path / "tuned")
    assert isinstance(teacher, models.Normalized) and models.head_classes(teacher.model) == 10
    assert card["runtime"] == "torch"
