"""KFP adapter of stage 5, ONNX export."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def export(
    config: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    report: Input[Artifact],
    publish_uri: str,
    onnx_model: Output[Model],
):
    """model.onnx + model.json + metrics.json, checked with onnxruntime; copied to publish_uri if set."""
    from funmatch.launch import tasks

    tasks.export(config, dataset, teacher, student, report, publish_uri, onnx_model)
