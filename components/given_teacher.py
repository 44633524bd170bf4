"""KFP adapter of stage 2 when teacher.finetune is false: the given teacher(s), shapes checked."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def given_teacher(config: str, dataset: Input[Dataset], teacher: Output[Model]):
    """Packs teacher.init (already fine-tuned for these classes) as the teacher artifact."""
    from funmatch.launch import tasks

    tasks.given_teacher(config, dataset, teacher)
