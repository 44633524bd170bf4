"""KFP adapter of stage 2, teacher fine-tuning (BiT-HyperRule)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import image


@dsl.component(base_image=image("cuda"), install_kfp_package=False)
def train_teacher(
    config: str, dataset: Input[Dataset], accelerator: str, num_accelerators: str, teacher: Output[Model]
):
    """Fine-tunes teacher.init on the dataset's classes (on the accelerators the task requests;
    `num_accelerators`: the STRING parameter that also sets the task's GPU limit)."""
    from funmatch.launch import tasks

    tasks.train_teacher(config, dataset, accelerator, int(num_accelerators), teacher)
