"""What evaluation sends to the Kubeflow UI on many classes: a capped view (the K most confused classes'
confusion matrix, the K worst classes' prec@1, summary stats), while the report artifact keeps every
figure. A synthetic 1000-class evaluation (logits and labels built directly, nothing trained)."""

import json

import numpy as np
import pytest
import torch
from kfp import dsl

from funmatch import config
from funmatch.launch import tasks
from funmatch.recipe.metrics import prec1
from funmatch.stages import evaluate

NUM_CLASSES, PER_CLASS = 1000, 10
# Classes confused with one another (think dog breeds), with distinct error counts so the ranking is
# unambiguous: class HEAVY[j] loses 9 - j // 4 of its 10 images to HEAVY[j + 1] (wrapping around).
HEAVY = [3, 17, 150, 151, 152, 153, 270, 271, 400, 401, 402, 555, 600, 601, 777, 778, 880, 881, 998, 999]
LIGHT = list(range(20, 120))  # one error each, into the next class: far less off-diagonal mass


def synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a 1000-class test split: every image right except the planted errors."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    pred = labels.clone()
    for j, c in enumerate(HEAVY):
        wrong = 9 - j // 4
        pred[c * PER_CLASS : c * PER_CLASS + wrong] = HEAVY[(j + 1) % len(HEAVY)]
    for c in LIGHT:
        pred[c * PER_CLASS] = c + 1
    logits = torch.full((len(labels), NUM_CLASSES), -1.0)
    logits[torch.arange(len(labels)), pred] = 1.0
    return logits, labels


def evaluation(num_classes: int = NUM_CLASSES) -> evaluate.Evaluation:
    logits, labels = synthetic()
    keep = labels < num_classes
    logits, labels = logits[keep][:, :num_classes], labels[keep]
    classes = [f"n{i:08d}" for i in range(num_classes)]
    confusion, per_class = evaluate.class_metrics(logits.argmax(1), labels, classes)
    metrics = {"student/test/prec@1": prec1(logits, labels), "teacher/test/prec@1": 0.9, **per_class}
    return evaluate.Evaluation(metrics, classes, confusion.tolist(), True, "passes", "<html></html>")


@pytest.fixture(scope="module")
def big() -> evaluate.Evaluation:
    return evaluation()


def test_ui_view_is_capped_on_many_classes(big):
    ui = big.ui_view()
    k = evaluate.UI_TOP_K
    assert len(ui.classes) == k and len(ui.confusion) == k and all(len(row) == k for row in ui.confusion)
    class_keys = [key for key in ui.metrics if key.startswith(evaluate.CLASS_PREC)]
    assert len(class_keys) == k
    assert len(ui.metrics) < 2 * k + 10  # not 1000 per-class metrics
    assert ui.metrics["student/test/prec@1"] == big.metrics["student/test/prec@1"]  # the rest as it was


def test_report_keeps_the_full_matrix_and_every_class(big, tmp_path):
    big.ui_view()  # must not touch the evaluation
    big.write(tmp_path)
    report = json.loads((tmp_path / "confusion.json").read_text())
    matrix = np.asarray(report["matrix"])
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES) and report["classes"] == big.classes
    assert matrix.sum() == NUM_CLASSES * PER_CLASS and (matrix.sum(1) == PER_CLASS).all()
    assert matrix[HEAVY[0], HEAVY[1]] == 9 and matrix[20, 21] == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len([key for key in metrics if key.startswith(evaluate.CLASS_PREC)]) == NUM_CLASSES
    assert metrics == big.metrics


def test_the_ui_matrix_holds_the_most_confused_classes(big):
    ui = big.ui_view()
    full = np.asarray(big.confusion)
    off_diagonal = full.sum(0) + full.sum(1) - 2 * np.diag(full)  # errors of the class + errors into it
    shown = [big.classes.index(c) for c in ui.classes]
    assert shown == sorted(HEAVY)  # the planted confusions, in class order
    assert off_diagonal[shown].min() > np.delete(off_diagonal, shown).max()
    assert np.array_equal(np.asarray(ui.confusion), full[np.ix_(shown, shown)])  # those rows and columns
    # 9 errors out and 9 in: HEAVY[1:4]; HEAVY[0] has 9 out but only 5 in (from HEAVY[-1])
    assert evaluate.most_confused(torch.as_tensor(full), 3) == sorted(HEAVY[1:4])


def test_the_ui_metrics_hold_the_worst_classes_and_summary_stats(big):
    ui = big.ui_view()
    per_class = {k[len(evaluate.CLASS_PREC) :]: v for k, v in big.metrics.items() if k.startswith(evaluate.CLASS_PREC)}
    shown = {k[len(evaluate.CLASS_PREC) :]: v for k, v in ui.metrics.items() if k.startswith(evaluate.CLASS_PREC)}
    assert all(big.metrics[evaluate.CLASS_PREC + c] == v for c, v in shown.items())
    assert max(shown.values()) <= min(v for c, v in per_class.items() if c not in shown)
    assert set(shown) == {big.classes[c] for c in HEAVY}  # the planted errors are the worst classes
    values = np.asarray(list(per_class.values()))
    assert ui.metrics["student/test/class_prec@1_mean"] == pytest.approx(values.mean())
    assert ui.metrics["student/test/class_prec@1_min"] == pytest.approx(values.min()) == pytest.approx(0.1)
    assert ui.metrics["student/test/class_prec@1_median"] == pytest.approx(np.median(values)) == 1.0


def test_small_datasets_are_unchanged():
    small = evaluation(evaluate.UI_MAX_CLASSES)
    ui = small.ui_view()
    assert ui.metrics == small.metrics and ui.classes == small.classes and ui.confusion == small.confusion
    assert len([key for key in ui.metrics if key.startswith(evaluate.CLASS_PREC)]) == evaluate.UI_MAX_CLASSES
    assert evaluate.ui_note(evaluate.UI_MAX_CLASSES) == "" and "1000 classes" in evaluate.ui_note(1000)


def test_the_evaluate_task_logs_the_capped_view_and_writes_the_full_report(big, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.evaluate_stage, "run", lambda *args: big)

    def artifact(cls, name):
        return cls(name=name, uri=str(tmp_path / name), metadata={})

    metrics, classification = artifact(dsl.Metrics, "metrics"), artifact(dsl.ClassificationMetrics, "cls")
    report, html = artifact(dsl.Artifact, "report"), artifact(dsl.HTML, "curves.html")
    dataset, teacher, student = artifact(dsl.Dataset, "d"), artifact(dsl.Model, "t"), artifact(dsl.Model, "s")
    cfg = config.load("demo-tiny").to_json()
    passed = tasks.evaluate(cfg, dataset, teacher, student, metrics, classification, report, html)
    assert passed == (True, "passes")
    ui = big.ui_view()
    assert set(metrics.metadata) == {key.replace("@", "_at_") for key in ui.metrics}
    assert "student/test/class_prec_at_1_median" in metrics.metadata
    matrix = classification.metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == ui.classes
    assert [r["row"] for r in matrix["rows"]] == ui.confusion
    assert json.loads((tmp_path / "cls").read_text())["classes"] == ui.classes
    assert len(json.loads((tmp_path / "report" / "confusion.json").read_text())["matrix"]) == NUM_CLASSES
