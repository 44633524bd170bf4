"""KFP adapter of stage 1, data prep."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def prepare_data(
    config_json: str,
    data_source: str,
    teacher_arch: str,
    teacher_init: str,
    teacher_resolution: int,
    teacher_finetune: bool,
    student_arch: str,
    student_resolution: int,
    distill_setup: str,
    distill_epochs: float,
    distill_batch_size: int,
    distill_lr: float,
    distill_weight_decay: float,
    distill_temperature: float,
    accelerator_type: str,
    accelerator_count: str,
    dataset: Output[Dataset],
) -> NamedTuple("Outputs", [("config", str)]):
    """Resolves the config from the UI parameters (`funmatch.config.pipeline_parameters()`, every one of
    them, or the task fails naming the difference) and prepares the dataset artifact."""
    parameters = dict(locals())  # first: the arguments only
    del parameters["config_json"], parameters["dataset"]
    from funmatch.launch import tasks

    return (tasks.prepare_data(config_json, parameters, dataset),)
