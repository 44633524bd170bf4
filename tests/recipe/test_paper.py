"""The paper's presets and datasets: values pinned to Table 4 / bit_i1k.py; tiny stand-ins of each layout."""

import json

import numpy as np
import pytest
from PIL import Image

from funmatch import config
from funmatch.app import cli
from funmatch.data import sources
from funmatch.errors import DataError
from funmatch.stages import prepare

TABLE4 = {  # dataset: {variant: (epochs, T, lr, wd, student test acc)}
    "flowers102": {
        "fast": (10_000, 10, 0.003, 3e-4, 92.83),
        "medium": (100_000, 1, 0.001, 1e-4, 95.54),
        "long": (1_000_000, 1, 0.0003, 1e-5, 96.93),
    },
    "pets": {
        "fast": (1000, 5, 0.01, 1e-3, 88.01),
        "medium": (3000, 10, 0.003, 3e-4, 90.08),
        "long": (30_000, 2, 0.003, 1e-5, 91.06),
    },
    "food101": {
        "fast": (100, 10, 0.01, 1e-3, 83.29),
        "medium": (1000, 10, 0.001, 3e-4, 86.64),
        "long": (3000, 5, 0.01, 1e-4, 87.20),
    },
    "sun397": {
        "fast": (100, 10, 0.01, 1e-3, 68.28),
        "medium": (1000, 10, 0.003, 1e-4, 73.46),
        "long": (3000, 10, 0.01, 3e-5, 74.26),
    },
}


@pytest.mark.parametrize("dataset", TABLE4)
def test_small_dataset_presets_equal_table4(dataset):
    for variant, (epochs, t, lr, wd, acc) in TABLE4[dataset].items():
        cfg = config.load(f"{dataset}-{variant}")
        d = cfg.distill
        assert (d.epochs, d.temperature, d.lr, d.weight_decay) == (epochs, t, lr, wd)
        assert (d.batch_size, d.warmup_steps, d.setup, d.grad_clip_norm) == (512, 1500, "funmatch", 1.0)
        assert (cfg.teacher.arch, cfg.student.arch, cfg.teacher.resolution, cfg.student.resolution) == (
            "bit-r152x2",
            "bit-r50x1",
            128,
            128,
        )
        assert cfg.expected.value == pytest.approx(acc / 100)
        assert cfg.eval.crop_pct == 0.8  # resize_small(160) | central_crop(128)


def test_imagenet_presets_equal_bit_i1k():
    cfg = config.load("imagenet")
    d = cfg.distill
    assert (d.batch_size, d.lr, d.weight_decay, d.temperature, d.warmup_steps, d.epochs) == (
        4096,
        0.03,
        3e-4,
        1.0,
        5000,
        1200,
    )
    assert (cfg.teacher.resolution, cfg.student.resolution, cfg.eval.crop_pct) == (224, 224, 0.875)
    assert cfg.expected.train_size == 1_255_544  # TFDS train[:98%] of 1,281,167 (round(1,255,543.66))
    assert config.load("imagenet-t384-s224").teacher.resolution == 384
    assert config.load("imagenet-t224-s160").student.resolution == 160
    ens = config.load("imagenet-ensemble")
    assert config.member_resolutions(ens.teacher) == [384, 224] and len(config.split_uris(ens.teacher.init)) == 2


def test_presets_json_states_paper_figures_and_cost(capsys):
    assert cli.main(["presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)["presets"]
    assert len(presets) >= 18
    fl = presets["flowers102-fast"]
    assert fl["expected"]["teacher_value"] == pytest.approx(0.9782)
    assert fl["images_processed"] == 10_000 * 1020 and fl["gpu_hours"] == pytest.approx(10.2e6 / 5950 / 3600, abs=0.01)
    assert fl["smoke"].endswith("--set smoke=true")


@pytest.mark.parametrize("preset", ["flowers102-long", "imagenet-ensemble"])
def test_smoke_variant_keeps_the_recipe_on_tiny_models(preset):
    full, smoke = config.load(preset), config.load(preset, ["smoke=true"])
    assert smoke.teacher.arch == "bit-r14-mini" and smoke.data.source == "demo" and smoke.runtime.device == "cpu"
    for key in ("setup", "temperature", "lr", "weight_decay", "optimizer", "crop_min_area", "grad_clip_norm"):
        assert getattr(smoke.distill, key) == getattr(full.distill, key)


@pytest.mark.slow
def test_smoke_run_of_a_paper_preset(tmp_path):
    assert cli.main(["run", "--preset", "pets-long", "--set", "smoke=true", "--output", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["export/onnx_max_abs_diff"] <= 1e-3


# ---------------------------------------------------------------- tiny stand-ins of each layout


def _jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)


def _flowers(root):
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = np.repeat(np.arange(1, 103), 3)  # 3 images per class
    for i in range(1, len(labels) + 1):
        _jpg(base / "jpg" / f"image_{i:05d}.jpg", i)
    ids = np.arange(1, len(labels) + 1).reshape(102, 3)
    savemat(base / "imagelabels.mat", {"labels": labels})
    savemat(base / "setid.mat", {"trnid": ids[:, 0], "valid": ids[:, 1], "tstid": ids[:, 2]})


def _pets(root):
    base = root / "oxford-iiit-pet"
    rows: dict[str, list[str]] = {"trainval": [], "test": []}
    for c, breed in enumerate(["Abyssinian", "beagle", "great_pyrenees"], start=1):
        for i in range(10):
            image_id = f"{breed}_{i}"
            _jpg(base / "images" / f"{image_id}.jpg", c * 100 + i)
            rows["trainval" if i < 7 else "test"].append(f"{image_id} {c} 1 1")
    (base / "annotations").mkdir(parents=True)
    for split, lines in rows.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _food(root):
    from funmatch.data import splits

    base = root / "food-101"
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for c in splits.food101_labels():  # all 101 classes, 4 train + 1 test images each
        for i in range(5):
            split = "train" if i < 4 else "test"
            meta[split].setdefault(c, []).append(f"{c}/{i}")
            _jpg(base / "images" / c / f"{i}.jpg", i)
    (base / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))


def _imagenet(root):
    for split, n in (("train", 50), ("val", 5)):
        for c in ("n01440764", "n01443537"):
            for i in range(n):
                _jpg(root / split / c / f"{c}_{i}.JPEG", i)


@pytest.mark.parametrize(
    "name, build, counts, classes",
    [
        ("flowers102", _flowers, (102, 102, 102), 102),
        ("pets", _pets, (19, 2, 9), 3),  # trainval 21 → TFDS train[:90%] / train[90%:] (round(18.9) = 19)
        ("food101", _food, (364, 40, 101), 101),  # train 404 → TFDS train[:90%] / train[90%:]; test.json
        # sun397 (TFDS's file lists, every one of the 397 classes): tests/data/test_splits.py, at the source
        ("imagenet", _imagenet, (98, 1, 10), 2),  # TFDS train[:98%] / train[99%:] (bit_i1k minival) / validation
    ],
)
def test_paper_dataset_layouts(tmp_path, name, build, counts, classes):
    build(tmp_path / "root")
    preset = {
        "flowers102": "flowers102-fast",
        "pets": "pets-fast",
        "food101": "food101-fast",
        "imagenet": "imagenet",
    }[name]
    cfg = config.load(preset, [f"data.root={tmp_path / 'root'}", "data.stored_resolution=8"])
    m = prepare.run(cfg, tmp_path / "out")
    assert m["num_classes"] == classes
    assert tuple(m["splits"][s]["count"] for s in ("train", "val", "test")) == counts


def test_named_dataset_without_root_or_files_is_clear(tmp_path):
    with pytest.raises(DataError, match="needs data.root"):
        sources.check_data("pets", "", False)
    with pytest.raises(DataError, match="torchvision's layout"):
        sources.named_source("pets", str(tmp_path), False)
