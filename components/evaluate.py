"""KFP adapter of stage 4, evaluation (and the quality gate's verdict)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def evaluate(
    config: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[Artifact],
    curves: Output[HTML],
) -> NamedTuple("Outputs", [("gate_passed", bool), ("gate_reason", str)]):
    """Student and teacher on minitrain/val/test: prec@1, agreement, KL, confusion matrix, curves."""
    from funmatch.launch import tasks

    return tasks.evaluate(config, dataset, teacher, student, metrics, classification, report, curves)
