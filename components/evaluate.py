"""KFP adapter of stage 4, evaluation."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def evaluate(config: str, dataset: Input[Dataset], teacher: Input[Model], student: Input[Model],
             metrics: Output[Metrics], classification: Output[ClassificationMetrics],
             report: Output[Artifact]):
    """Student and teacher on minitrain/val/test: prec@1, agreement, KL, confusion matrix."""
    from funmatch import tasks

    tasks.evaluate(config, dataset, teacher, student, metrics, classification, report)
