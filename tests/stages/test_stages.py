"""Each stage's core on the bundled data with the demo-tiny preset."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from funmatch import config
from funmatch.recipe import models
from funmatch.stages import distill, evaluate, export, finetune


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_cfg, dataset_dir, teacher_dir):
    out = tmp_path_factory.mktemp("student") / "student"
    distill.run(tiny_cfg, dataset_dir, teacher_dir, out)
    return out


def test_teacher_artifact(teacher_dir):
    info = json.loads((teacher_dir / "model.json").read_text())
    assert info["arch"] == "bit-r18-mini" and len(info["classes"]) == 10 and info["steps"] == 20
    assert 0.0 <= info["val_prec1"] <= 1.0


def test_given_teacher_checks_shapes(tmp_path, tiny_cfg, dataset_dir, teacher_dir):
    weights = str(teacher_dir / "member-0.safetensors")
    cfg = config.load("demo-tiny", [f"teacher.init={weights},{weights}", "teacher.finetune=false"])
    info = finetune.given_teacher(cfg, dataset_dir, tmp_path / "given")
    assert info["finetuned"] is False
    members, _ = models.load_bundle(tmp_path / "given")
    assert len(members) == 2  # an ensemble of two
    bad = config.load("demo-tiny", [f"teacher.init={weights}", "teacher.finetune=false", "teacher.arch=bit-r14-mini"])
    with pytest.raises(Exception, match="does not fit bit-r14-mini"):
        finetune.given_teacher(bad, dataset_dir, tmp_path / "bad")


@pytest.mark.slow
def test_distill_is_deterministic_and_logs_history(tmp_path, tiny_cfg, dataset_dir, teacher_dir, student_dir):
    again = tmp_path / "again"
    distill.run(tiny_cfg, dataset_dir, teacher_dir, again)
    a, b = load_file(str(student_dir / "member-0.safetensors")), load_file(str(again / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((student_dir / "history.json").read_text())
    assert history[-1]["step"] == 32 and "val_agree@1" in history[-1]
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("setup", ["fixed", "independent", "consistent"])
def test_every_setup_trains(tmp_path, dataset_dir, teacher_dir, setup):
    cfg = config.load(
        "demo-tiny", [f"distill.setup={setup}", "distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0"]
    )
    info = distill.run(cfg, dataset_dir, teacher_dir, tmp_path / setup)
    assert info["setup"] == setup and info["steps"] == 7


def test_warmup_longer_than_run_is_refused_before_training(tmp_path, dataset_dir, teacher_dir):
    cfg = config.load("demo-tiny", ["distill.warmup_steps=1000"])
    with pytest.raises(config.ConfigError, match="warmup_steps=1000"):
        distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s")


def test_resume_from_checkpoint_gives_identical_weights(tmp_path, tiny_cfg, dataset_dir, teacher_dir, student_dir):
    """Checkpoints every 10 steps; dropping the final one leaves step 30 to resume from."""
    ckpt = tmp_path / "ckpt"
    distill.run(tiny_cfg, dataset_dir, teacher_dir, tmp_path / "full", checkpoint_dir=str(ckpt))
    for ext in ("json", "safetensors"):
        (ckpt / f"ckpt-000000032.{ext}").unlink()
    distill.run(tiny_cfg, dataset_dir, teacher_dir, tmp_path / "resumed", checkpoint_dir=str(ckpt))
    a = load_file(str(student_dir / "member-0.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "member-0.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_and_export(tmp_path, tiny_cfg, dataset_dir, teacher_dir, student_dir):
    result = evaluate.run(tiny_cfg, dataset_dir, teacher_dir, student_dir)
    metrics = result.metrics
    for split in ("minitrain", "val", "test"):
        for key in ("prec@1", "agree@1", "agree@5", "kl", "l2"):
            assert f"student/{split}/{key}" in metrics
        assert f"teacher/{split}/prec@1" in metrics
    assert np.asarray(result.confusion).sum() == 2000 and len(result.classes) == 10
    assert result.gate_passed == (metrics["gate/passed"] == 1.0) and "prec@1" in result.gate_reason
    result.write(tmp_path / "eval")
    confusion = json.loads((tmp_path / "eval" / "confusion.json").read_text())
    assert confusion["matrix"] == result.confusion
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics

    out = tmp_path / "export"
    exported = export.run(tiny_cfg, dataset_dir, student_dir, metrics, out, {"distill": 1.0})
    m = exported.metrics
    assert m["export/onnx_max_abs_diff"] <= 1e-3 and m["wall_s"] > 1.0
    served = ("serving/funmatch/1/model.onnx", "serving/funmatch/config.pbtxt", "serving/funmatch/labels.txt")
    assert exported.files == ("model.onnx", *served, "inferenceservice.yaml", "model.json", "metrics.json")
    assert json.loads((out / "metrics.json").read_text()) == m
    card = json.loads((out / "model.json").read_text())
    assert card["classes"][0] == "T-shirt/top" and card["input"]["shape"] == ["batch", 3, 32, 32]
    assert card["preprocessing"]["value_range"] == [-1.0, 1.0]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):  # dynamic batch axis
        assert session.run(None, {"image": np.zeros((batch, 3, 32, 32), np.float32)})[0].shape == (batch, 10)

    export.publish_result(out, str(tmp_path / "published"))
    sums = (tmp_path / "published" / "SHA256SUMS").read_text().splitlines()
    assert [line.split()[1] for line in sums] == list(exported.files)


def test_several_students_equal_separate_runs_on_the_same_batches(tmp_path, dataset_dir, teacher_dir):
    base = ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.eval_every=0"]
    multi = config.load("demo-tiny", base + ["distill.extra_students=bit-r18-mini@32"])
    info = distill.run(multi, dataset_dir, teacher_dir, tmp_path / "multi", checkpoint_dir=str(tmp_path / "ck"))
    assert info["extra_students"] == ["extra-1"] and (tmp_path / "ck-extra1").is_dir()
    distill.run(config.load("demo-tiny", base), dataset_dir, teacher_dir, tmp_path / "alone-a")
    distill.run(
        config.load("demo-tiny", base + ["student.arch=bit-r18-mini"]), dataset_dir, teacher_dir, tmp_path / "alone-b"
    )
    for together, alone in (("multi", "alone-a"), ("multi/extra-1", "alone-b")):
        a = load_file(str(tmp_path / together / "member-0.safetensors"))
        b = load_file(str(tmp_path / alone / "member-0.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), together


def test_gate_verdicts():
    cfg = config.load("demo", ["gate.min_student_acc=0.5", "gate.min_teacher_ratio=0.9"])
    assert evaluate.gate(cfg, {"student/test/prec@1": 0.85, "teacher/test/prec@1": 0.9})[0]
    ok, why = evaluate.gate(cfg, {"student/test/prec@1": 0.8, "teacher/test/prec@1": 0.9})
    assert not ok and "gate.min_teacher_ratio=0.9" in why
    ok, why = evaluate.gate(cfg, {"student/test/prec@1": 0.4, "teacher/test/prec@1": 0.41})
    assert not ok and "gate.min_student_acc=0.5" in why


def test_tensorboard_events_and_shampoo(tmp_path, dataset_dir, teacher_dir):
    cfg = config.load(
        "demo-tiny",
        ["distill.epochs=0.05", "distill.warmup_steps=1", "distill.optimizer=shampoo", "distill.log_every=2"],
    )
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "s" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert len(losses) == 4 and all(v == v for v in losses)  # steps 2, 4, 6, 7; finite with Shampoo


@pytest.mark.slow
def test_extra_students_are_evaluated_and_exported(tmp_path, dataset_dir, teacher_dir):
    cfg = config.load(
        "demo-tiny",
        [
            "distill.epochs=0.05",
            "distill.warmup_steps=1",
            "distill.eval_every=0",
            "distill.extra_students=bit-r14-mini@64",
        ],
    )
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "s")
    metrics = evaluate.run(cfg, dataset_dir, teacher_dir, tmp_path / "s").metrics
    assert "students/bit-r14-mini@64/test/prec@1" in metrics and "students/bit-r14-mini@64/test/agree@1" in metrics
    export.run(cfg, dataset_dir, tmp_path / "s", metrics, tmp_path / "x")
    card = json.loads((tmp_path / "x" / "model.json").read_text())
    assert card["extra_models"] == [{"file": "model-bit-r14-mini-64.onnx", "arch": "bit-r14-mini", "resolution": 64}]
    session = ort.InferenceSession(
        str(tmp_path / "x" / "model-bit-r14-mini-64.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})[0].shape == (2, 10)
    assert "model-bit-r14-mini-64.onnx" in export.result_files(tmp_path / "x")


@pytest.mark.slow
def test_readme_consumer_snippet_runs_on_an_export(tmp_path, tiny_cfg, dataset_dir, teacher_dir, student_dir, capsys):
    """The README's ten lines, run as written against a real export."""
    import re
    from pathlib import Path

    from PIL import Image

    metrics = evaluate.run(tiny_cfg, dataset_dir, teacher_dir, student_dir).metrics
    export.run(tiny_cfg, dataset_dir, student_dir, metrics, tmp_path / "demo")
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "photo.jpg")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    found = re.search(r"```python\n(import json, numpy.*?)```", readme, re.S)
    assert found, "the README's consumer snippet is gone"
    snippet = found.group(1)
    snippet = snippet.replace("runs/demo/", f"{tmp_path / 'demo'}/").replace(
        '"photo.jpg"', f'"{tmp_path / "photo.jpg"}"'
    )
    exec(compile(snippet, "README.md", "exec"), {})
    card = json.loads((tmp_path / "demo" / "model.json").read_text())
    assert capsys.readouterr().out.strip().splitlines()[-1] in card["classes"]


@pytest.mark.slow
def test_several_students_resume_together(tmp_path, dataset_dir, teacher_dir):
    """A crash between the students' saves: every student resumes at the first student's step."""
    base = [
        "distill.epochs=0.05",
        "distill.warmup_steps=1",
        "distill.eval_every=0",
        "distill.checkpoint_every_steps=3",
        "distill.extra_students=bit-r18-mini@32",
    ]
    cfg = config.load("demo-tiny", base)
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "full")
    ck = tmp_path / "ck"
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "first", checkpoint_dir=str(ck))
    for ext in ("json", "safetensors"):  # the first student's final save never happened
        (ck / f"ckpt-000000007.{ext}").unlink()
    (ck / "latest").unlink()
    distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "resumed", checkpoint_dir=str(ck))
    for sub in ("", "extra-1/"):
        a = load_file(str(tmp_path / "full" / f"{sub}member-0.safetensors"))
        b = load_file(str(tmp_path / "resumed" / f"{sub}member-0.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
