import json
import math

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
        ("distill.epochs=-2", ["distill.epochs", "0 (derived from the train-set size)", "positive"]),
        ("distill.batch_size=-4", ["distill.batch_size", "positive"]),
        ("student.resolution=100", ["student.resolution", "multiple of 32"]),
        ("teacher.arch=bit-r152x3", ["teacher.arch", "bit-r152x2"]),
        ("teacher.init=weights.pkl", ["teacher.init", ".npz", ".pt"]),
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


@pytest.mark.parametrize("overrides", [[], ["smoke=true"], ["resources.timeout_hours=2.5"]])
def test_deadlines_and_retries_cover_the_presets_budget(overrides):
    """The attempts, each losing START_HOURS to its start, fit the distillation at the measured rate with
    margin, and one more retry per day of it absorbs the preemptions; the retry window holds every attempt
    (the IR side: tests/pipelines/test_backend_contract.py)."""
    for name in config.preset_names():
        cfg = config.load(name, overrides)
        r, work = cfg.resources, config.TIMEOUT_MARGIN * config.gpu_hours(cfg)
        preemptions = math.ceil(work / config.PREEMPTIBLE_HOURS)
        assert (r.retries + 1 - preemptions) * (r.timeout_hours - config.START_HOURS) >= work, name
        assert r.retries >= config.MIN_RETRIES, name
        assert config.retry_window_s(cfg) >= (r.retries + 1) * r.timeout_hours * 3600, name
        if not overrides:
            assert config.MIN_TIMEOUT_HOURS <= r.timeout_hours <= config.MAX_TIMEOUT_HOURS, name
            assert (work > 0) == (r.accelerator_count >= 1), name  # every GPU preset states its rate
    imagenet = config.load("imagenet").resources
    assert (imagenet.timeout_hours, imagenet.retries) == (24, 54)  # 423 GPU-hours: a hung attempt ends in a day
    assert config.load("imagenet", ["resources.retries=2"]).resources.retries == 2  # as set


def test_cpu_configs_and_gpu_settings_are_checked():
    assert config.load("demo").resources.accelerator_count == 0  # the CPU presets
    assert all(config.load(n, ["smoke=true"]).resources.accelerator_count == 0 for n in ("pets-long", "imagenet"))
    with pytest.raises(ConfigError, match=r"^resources\.accelerator_type='' is not allowed"):
        config.load("imagenet", ["resources.accelerator_type="])
    with pytest.raises(ConfigError, match=r"^resources\.timeout_hours=-1\.0 is not allowed"):
        config.load("imagenet", ["resources.timeout_hours=-1"])


def test_hash_changes_with_results_relevant_values():
    a, b = config.load("demo"), config.load("demo", ["distill.lr=0.5"])
    assert a.hash() != b.hash() and a.hash() == config.load("demo").hash()


def test_describe_presets_is_json():
    d = config.describe_presets()
    assert {"demo", "demo-tiny"} <= set(d)
    json.dumps(d)
    assert d["demo"]["expected"]["metric"] == "student/test/prec@1"


def test_label_free_and_out_of_domain_keys():
    """data.labels, teacher.classes and distill.images keep every existing hash at their defaults, change it
    when set, and need a given teacher (one line); gate.min_agreement is a fraction."""
    demo = config.load("demo")
    assert (demo.data.labels, demo.teacher.classes, demo.distill.images, demo.gate.min_agreement) == (
        "folders",
        "",
        "",
        0.9,
    )
    given = ["teacher.init=t.safetensors", "teacher.finetune=false"]
    base = config.load("demo", given).hash()
    for item in ("data.labels=none", "teacher.classes=c.txt", "distill.images=/data/food"):
        assert config.load("demo", [*given, item]).hash() != base, item
    for item in ("data.labels=none", "distill.images=/data/food"):
        with pytest.raises(ConfigError, match=r"is not allowed: expected a given teacher \(teacher\.init") as e:
            config.load("demo", [item])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^data\.labels='some' is not allowed: expected one of folders, none$"):
        config.load("demo", ["data.labels=some"])
    with pytest.raises(ConfigError, match=r"^distill\.images='/x' is not allowed: expected empty when data\.labels"):
        config.load("demo", [*given, "data.labels=none", "distill.images=/x"])
    with pytest.raises(ConfigError, match=r"^gate\.min_agreement=1\.5 is not allowed"):
        config.load("demo", ["gate.min_agreement=1.5"])
    ood = config.load("pets-on-food101")
    assert (ood.data.source, ood.distill.images, ood.teacher.finetune) == ("pets", "food101", False)
    smoke = config.load("pets-on-food101", ["smoke=true"])  # the tiny variant trains its teacher: in-domain
    assert (smoke.distill.images, smoke.teacher.finetune) == ("", True)
