"""Each KFP adapter through its python_func, with real kfp artifact objects."""

import json

import pytest
from kfp import dsl

from components.distill import distill
from components.evaluate import evaluate
from components.export import export
from components.given_teacher import given_teacher
from components.prepare_data import prepare_data
from components.train_teacher import train_teacher
from funmatch import config


def _artifact(cls, path):
    return cls(name=path.name, uri=str(path), metadata={})


@pytest.mark.slow
def test_components_chain(tmp_path):
    cfg = config.load("demo-tiny")
    ui = {name: config.get(cfg, key) for name, key in config.pipeline_parameters().items()} | {"distill_epochs": 0.1}
    dataset = _artifact(dsl.Dataset, tmp_path / "dataset")
    (resolved,) = prepare_data.python_func(config_json=cfg.to_json(), dataset=dataset, **ui)
    assert json.loads(resolved)["distill"]["epochs"] == 0.1  # the UI parameter won
    assert dataset.metadata["train_count"] == 8000

    teacher = _artifact(dsl.Model, tmp_path / "teacher")
    train_teacher.python_func(
        config=resolved, dataset=dataset, accelerator="nvidia.com/gpu", num_accelerators="1", teacher=teacher
    )
    assert teacher.metadata["arch"] == "bit-r18-mini"

    given = _artifact(dsl.Model, tmp_path / "given")
    cfg_given = json.loads(resolved)
    cfg_given["teacher"] |= {"finetune": False, "init": str(tmp_path / "teacher" / "member-0.safetensors")}
    given_teacher.python_func(config=json.dumps(cfg_given), dataset=dataset, teacher=given)
    assert given.metadata["init"].endswith("member-0.safetensors")

    student = _artifact(dsl.Model, tmp_path / "student")
    distill.python_func(
        config=resolved,
        dataset=dataset,
        teacher=teacher,
        checkpoint_root=str(tmp_path / "ckpt"),
        accelerator="nvidia.com/gpu",
        num_accelerators="1",
        trainjob_image="unused",
        student=student,
    )
    assert student.metadata["steps"] == 13
    assert list((tmp_path / "ckpt").glob("*/distill/ckpt-000000013.json"))

    metrics = _artifact(dsl.Metrics, tmp_path / "metrics")
    classification = _artifact(dsl.ClassificationMetrics, tmp_path / "classification")
    report = _artifact(dsl.Artifact, tmp_path / "report")
    curves = _artifact(dsl.HTML, tmp_path / "curves.html")
    passed, reason = evaluate.python_func(
        config=resolved,
        dataset=dataset,
        teacher=teacher,
        student=student,
        metrics=metrics,
        classification=classification,
        report=report,
        curves=curves,
    )
    assert passed and "passes the gate" in reason  # demo-tiny: min_teacher_ratio 0
    assert "student/test/prec_at_1" in metrics.metadata
    assert "<table" in (tmp_path / "curves.html").read_text()
    assert classification.metadata["confusionMatrix"]["rows"][0]["row"]

    onnx_model = _artifact(dsl.Model, tmp_path / "onnx")
    export.python_func(
        config=resolved,
        dataset=dataset,
        teacher=teacher,
        student=student,
        report=report,
        publish_uri=str(tmp_path / "published"),
        onnx_model=onnx_model,
    )
    assert onnx_model.metadata["onnx_max_abs_diff"] <= 1e-3
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == [
        "SHA256SUMS",
        "inferenceservice.yaml",
        "metrics.json",
        "model.json",
        "model.onnx",
        "serving",
    ]
