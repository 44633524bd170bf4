"""Distillation without labels (data.labels=none) and on out-of-domain images (distill.images): a given
demo-tiny teacher, unlabelled synthetic images of mixed sizes and formats without class folders."""

import json
import math
import tarfile

import numpy as np
import onnx
import pytest
from PIL import Image

from funmatch import config
from funmatch.data import prepared
from funmatch.errors import ConfigError
from funmatch.stages import distill, evaluate, export, finetune, prepare

N_IMAGES = 240
SHORT = ["distill.epochs=2", "distill.batch_size=32", "distill.warmup_steps=2", "distill.eval_every=6"]  # 12 steps
SHORTER = ["distill.epochs=2", "distill.warmup_steps=2", "distill.eval_every=0", "eval.minitrain_size=64"]  # 7 steps


@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory):
    """Synthetic pictures (gradients and boxes), PNG and JPEG, sizes 24..61 px, most at the top level and some
    one folder down; one corrupt file. No class folders."""
    root = tmp_path_factory.mktemp("unlabelled") / "images"
    (root / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = (int(v) for v in rng.integers(24, 62, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * rng.integers(1, 9)) % 256, (yy * rng.integers(1, 9)) % 256, np.full((h, w), i % 256)], -1)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
        folder = root / "more" if i % 5 == 0 else root
        Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image file: ignored")
    return root


def _given(teacher_dir, *more):
    return ["teacher.finetune=false", f"teacher.init={teacher_dir / 'member-0.safetensors'}", *more]


def test_label_free_run_reports_agreement_and_gates_on_it(tmp_path, unlabelled_dir, teacher_dir):
    cfg = config.load("demo-tiny", [f"data.source={unlabelled_dir}", "data.labels=none", *_given(teacher_dir), *SHORT])
    manifest = prepare.run(cfg, tmp_path / "data")
    counts = {s: manifest["splits"][s]["count"] for s in prepared.SPLITS}
    assert manifest["labels"] == "none" and manifest["classes"] == [] and sum(counts.values()) == N_IMAGES
    assert 23 <= counts["val"] <= 24 and 23 <= counts["test"] <= 24  # 10 % each of 241 files, one unreadable
    assert (
        manifest["skipped"]["count"] == 1 and manifest["skipped"]["files"][0]["quarantine"] == "quarantine/broken.jpg"
    )
    assert all((prepared.load_labels(tmp_path / "data", s) == prepared.NO_LABEL).all() for s in prepared.SPLITS)

    teacher_classes = json.loads((teacher_dir / "model.json").read_text())["classes"]
    info = finetune.given_teacher(cfg, tmp_path / "data", tmp_path / "teacher")
    assert info["classes"] == teacher_classes  # the teacher's label space, from its artifact's model.json
    student = distill.run(cfg, tmp_path / "data", tmp_path / "teacher", tmp_path / "student")
    assert student["classes"] == teacher_classes
    history = json.loads((tmp_path / "student" / "history.json").read_text())
    assert "val_agree@1" in history[-1] and not any("val_prec@1" in h for h in history)

    result = evaluate.run(cfg, tmp_path / "data", tmp_path / "teacher", tmp_path / "student")
    m = result.metrics
    for key in ("agree@1", "agree@5", "kl"):
        assert math.isfinite(m[f"student/test/{key}"]) and m[f"student/test/{key}"] >= 0.0
    assert m["student/test/agree@5"] >= m["student/test/agree@1"]
    assert not any("prec@1" in k for k in m) and result.classes == [] and result.confusion == []
    assert "prec@1" not in result.report_html and "agree@5" in result.report_html
    assert result.gate_passed and "gate.min_agreement=0.0" in result.gate_reason  # demo-tiny: no bar
    strict = config.load("demo-tiny", ["gate.min_agreement=0.9"])
    ok, why = evaluate.gate(strict, {"student/test/agree@1": 0.85, "student/test/kl": 0.1})
    assert not ok and why == "student test agree@1 0.8500 < gate.min_agreement=0.9 (no labels)"
    assert evaluate.gate(strict, {"student/test/agree@1": 0.95})[0]
    result.write(tmp_path / "eval")
    assert not (tmp_path / "eval" / "confusion.json").exists()
    assert not any("prec" in k for k in result.ui_view().metrics)

    exported = export.run(cfg, tmp_path / "data", tmp_path / "student", m, tmp_path / "export")
    card = exported.card
    assert card["classes"] == teacher_classes and set(card["metrics"]) == {
        "student/test/agree@1",
        "student/test/agree@5",
        "student/test/kl",
    }
    labels = (tmp_path / "export" / "serving" / "funmatch" / "labels.txt").read_text().splitlines()
    assert labels == teacher_classes
    meta = exported.metadata()
    assert meta["student_test_agree1"] == m["student/test/agree@1"] and "student_test_prec1" not in meta

    # an ONNX teacher's class names: its metadata_props, else the model.json of the export it came from
    assert finetune.teacher_classes(cfg, str(tmp_path / "export" / "model.onnx")) == teacher_classes
    proto = onnx.load(str(tmp_path / "export" / "model.onnx"))
    onnx.helper.set_model_props(proto, {"classes": json.dumps([f"c{i}" for i in range(10)])})
    (tmp_path / "bare").mkdir()
    onnx.save(proto, str(tmp_path / "bare" / "teacher.onnx"))
    assert finetune.teacher_classes(cfg, str(tmp_path / "bare" / "teacher.onnx"))[9] == "c9"


def test_label_free_needs_a_given_teacher_and_its_class_names(tmp_path, unlabelled_dir, teacher_dir):
    with pytest.raises(ConfigError, match=r"^data\.labels='none' is not allowed: expected a given teacher") as e:
        config.load("demo-tiny", [f"data.source={unlabelled_dir}", "data.labels=none"])
    assert "\n" not in str(e.value)
    cfg = config.load("demo-tiny", [f"data.source={unlabelled_dir}", "data.labels=none", *_given(teacher_dir)])
    manifest = prepare.run(cfg, tmp_path / "data")
    alone = tmp_path / "alone.safetensors"  # the teacher's weights without its artifact's model.json
    alone.write_bytes((teacher_dir / "member-0.safetensors").read_bytes())
    nameless = config.load(
        "demo-tiny",
        [f"data.source={unlabelled_dir}", "data.labels=none", "teacher.finetune=false", f"teacher.init={alone}"],
    )
    with pytest.raises(ConfigError, match=r"records no class names and teacher\.classes is empty"):
        finetune.given_teacher(nameless, tmp_path / "data", tmp_path / "t1")
    names = [f"kind-{i}" for i in range(10)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    nameless.teacher.classes = str(tmp_path / "classes.txt")
    assert finetune.given_teacher(nameless, tmp_path / "data", tmp_path / "t2")["classes"] == names
    (tmp_path / "seven.txt").write_text("\n".join(names[:7]))
    nameless.teacher.classes = str(tmp_path / "seven.txt")
    with pytest.raises(Exception, match=r"the teacher's 7 class names do not fit .*alone\.safetensors"):
        finetune.given_teacher(nameless, tmp_path / "data", tmp_path / "t3")
    with pytest.raises(ConfigError, match=r"^teacher\.finetune=True is not allowed: the train images .* no labels"):
        finetune.run(config.load("demo-tiny"), tmp_path / "data", tmp_path / "t4")
    assert manifest["labels"] == "none"


def test_out_of_domain_distils_on_other_images_and_evaluates_on_labelled_test(
    tmp_path, unlabelled_dir, dataset_dir, teacher_dir
):
    archive = tmp_path / "other.tar.gz"  # the archive machinery: extracted into the artifact, then removed
    with tarfile.open(archive, "w:gz") as t:
        t.add(unlabelled_dir, arcname="other")
    with pytest.raises(ConfigError, match=r"^distill\.images=.* is not allowed: expected a given teacher"):
        config.load("demo-tiny", [f"distill.images={archive}"])
    cfg = config.load("demo-tiny", [f"distill.images={archive}", *_given(teacher_dir), *SHORTER])
    manifest = prepare.run(cfg, tmp_path / "data")
    assert manifest["source"] == "demo" and manifest["distill_images"]["source"] == str(archive)
    assert manifest["labels"] == "folders" and "train: " in manifest["split_origin"]
    assert not (tmp_path / "data" / ".images").exists()
    assert manifest["splits"]["train"]["count"] == N_IMAGES  # the other images, not demo's 8000
    assert manifest["skipped"]["files"][0]["path"] == f"{archive}!/broken.jpg"
    assert (prepared.load_labels(tmp_path / "data", "train") == prepared.NO_LABEL).all()
    ours, labelled = prepared.load_split(tmp_path / "data", "train")[0], prepared.load_split(dataset_dir, "train")[0]
    assert not ({im.tobytes() for im in ours} & {im.tobytes() for im in labelled})
    for split in ("val", "test"):  # evaluation data: data.source's, labels kept
        assert np.array_equal(prepared.load_labels(tmp_path / "data", split), prepared.load_labels(dataset_dir, split))
    assert prepared.labelled_splits(manifest) == ("val", "test")

    finetune.given_teacher(cfg, tmp_path / "data", tmp_path / "teacher")
    distill.run(cfg, tmp_path / "data", tmp_path / "teacher", tmp_path / "student")
    m = evaluate.run(cfg, tmp_path / "data", tmp_path / "teacher", tmp_path / "student").metrics
    assert "student/test/prec@1" in m and "teacher/test/prec@1" in m and "student/val/prec@1" in m
    assert "teacher/minitrain/prec@1" not in m and "student/minitrain/agree@1" in m  # train: no labels
