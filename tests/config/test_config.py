import json

import pytest

from funmatch import config
from funmatch.errors import ConfigError


def test_every_preset_loads_and_round_trips_through_json():
    for name in config.preset_names():
        cfg = config.load(name)
        assert config.from_json(cfg.to_json()).to_dict() == cfg.to_dict()


def test_required_keys_exist():
    keys = config.all_keys()
    for k in [
        "data.source",
        "teacher.arch",
        "teacher.init",
        "teacher.resolution",
        "student.arch",
        "student.resolution",
        "distill.setup",
        "distill.epochs",
        "distill.batch_size",
        "distill.lr",
        "distill.weight_decay",
        "distill.temperature",
    ]:
        assert k in keys


def test_set_overrides_with_types():
    cfg = config.load(
        "demo",
        [
            "distill.epochs=7",
            "distill.lr=1e-3",
            "teacher.finetune=false",
            "teacher.init=/x/t.safetensors",
            "data.source=no",
        ],
    )
    assert cfg.distill.epochs == 7.0 and isinstance(cfg.distill.epochs, float)
    assert cfg.distill.lr == 1e-3
    assert cfg.teacher.finetune is False
    assert cfg.data.source == "no"  # strings stay verbatim (YAML would read 'no' as False)


def test_preset_inherits_base():
    tiny, demo = config.load("demo-tiny"), config.load("demo")
    assert tiny.teacher.arch == demo.teacher.arch
    assert tiny.distill.epochs < demo.distill.epochs


@pytest.mark.parametrize(
    "item, words",
    [
        ("distill.epochz=3", ["distill.epochz", "distill.epochs"]),
        ("distill.epochs=three", ["distill.epochs", "number", "three"]),
        ("distill.batch_size=2.5", ["distill.batch_size", "integer"]),
        ("teacher.finetune=maybe", ["teacher.finetune", "true or false"]),
        ("distill.setup=teleport", ["teleport", "funmatch"]),
        ("distill.epochs=0", ["distill.epochs", "positive"]),
        ("distill.batch_size=-4", ["distill.batch_size", "positive"]),
        ("student.resolution=100", ["student.resolution", "multiple of 32"]),
        ("teacher.arch=bit-r152x3", ["teacher.arch", "bit-r152x2"]),
        ("teacher.init=weights.pt", ["teacher.init", ".npz"]),
        ("distill.crop_min_area=0", ["distill.crop_min_area"]),
        ("novalue", ["KEY=VALUE"]),
        ("data.encoding=png", ["data.encoding", "'png'", "raw or jpeg"]),
        ("data.jpeg_quality=101", ["data.jpeg_quality", "[1, 100]"]),
        ("runtime.jpeg_decode=gpu", ["runtime.jpeg_decode", "cpu, device"]),
        ("runtime.loader_workers=-1", ["runtime.loader_workers", "0 (auto)"]),
        ("runtime.compile_mode=fast", ["runtime.compile_mode", "reduce-overhead"]),
    ],
)
def test_bad_overrides_name_key_value_and_expectation(item, words):
    with pytest.raises(ConfigError) as e:
        config.load("demo", [item])
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ConfigError, match="did you mean demo"):
        config.load("demoo")


def test_teacher_must_be_trained_or_given():
    with pytest.raises(ConfigError, match="teacher.finetune"):
        config.load("demo", ["teacher.finetune=false"])


def test_hash_changes_with_results_relevant_values():
    a, b = config.load("demo"), config.load("demo", ["distill.lr=0.5"])
    assert a.hash() != b.hash() and a.hash() == config.load("demo").hash()


def test_describe_presets_is_json():
    d = config.describe_presets()
    assert {"demo", "demo-tiny"} <= set(d)
    json.dumps(d)
    assert d["demo"]["expected"]["metric"] == "student/test/prec@1"
