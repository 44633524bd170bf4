"""KFP adapter of the quality gate's stop: the run ends here, saying why, when the student falls short."""

from kfp import dsl

from components import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def quality_gate_stop(reason: str):
    """Fails the run with the gate's reason (export and publishing are skipped)."""
    from funmatch.launch import tasks

    tasks.quality_gate_stop(reason)
