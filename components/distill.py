"""KFP adapter of stage 3, function-matching distillation."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import image


@dsl.component(base_image=image("cuda"), install_kfp_package=False)
def distill(
    config: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    checkpoint_root: str,
    accelerator: str,
    num_accelerators: str,
    trainjob_image: str,
    student: Output[Model],
):
    """Distils the teacher into the student; resumes from checkpoint_root after a preemption.
    `num_accelerators`: the STRING parameter that also sets the task's GPU limit (the KFP driver reads
    no other kind there). `trainjob_image`: the image of a multi-node TrainJob's pods (distill.num_nodes > 1)."""
    from funmatch.launch import tasks

    gpus = int(num_accelerators)
    tasks.distill(config, dataset, teacher, checkpoint_root, accelerator, gpus, trainjob_image, student)
