"""The DAG: data prep → teacher (fine-tune, or the given one) → distill → evaluate → export.

`build(cfg)` returns a KFP pipeline whose parameters default to `cfg`'s values: the knobs a user
changes in the Kubeflow UI, plus the whole resolved config as `config_json`. The teacher stage is a
`dsl.If` on `teacher_finetune`: fine-tune, or else take the given teacher. Stages 3-5 form one
sub-pipeline that each branch calls with its teacher artifact (kfp.local cannot yet route an
artifact through `dsl.OneOf`). GPU settings (accelerator type and count as parameters, node
selector, toleration, memory-backed /dev/shm, a long timeout, retries with backoff) live on the
teacher and distill tasks; kfp.local ignores them. Export publishes to `publish_uri` when it is set.
"""

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from components import image
from components.distill import distill
from components.evaluate import evaluate
from components.export import export
from components.given_teacher import given_teacher
from components.prepare_data import prepare_data
from components.quality_gate import quality_gate_stop
from components.train_teacher import train_teacher
from funmatch.config import Config, pipeline_parameters

PIPELINE_NAME = "funmatch"


def build(cfg: Config):
    """The pipeline function for `cfg` (its defaults are the preset's values)."""
    t, s, k, r = cfg.teacher, cfg.student, cfg.distill, cfg.resources
    cpu_image, cuda_image = image("cpu", r.image), image("cuda", r.image)

    def on_gpu_pool(
        task: dsl.PipelineTask, accelerator_type, accelerator_count, launcher: bool = False
    ) -> dsl.PipelineTask:  # accelerator_count: a pipeline parameter, or 1
        """GPU pool settings; `launcher`: the task only starts a multi-node TrainJob, so no GPUs for it."""
        task.set_container_image(cuda_image)
        kubernetes.set_timeout(task, int(r.timeout_hours * 3600))
        # A preempted task exits non-zero after checkpointing; the retry resumes from checkpoint_root.
        task.set_retry(num_retries=r.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
        if launcher:
            return task
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        task.set_cpu_request("8").set_memory_request("48Gi")
        kubernetes.add_node_selector(task, r.node_selector_key, r.node_selector_value)
        kubernetes.add_toleration(task, key=r.toleration_key, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=r.shm_size
        )
        return task

    @dsl.pipeline(name="distill-evaluate-export")
    def distill_evaluate_export(
        config: str,
        dataset: Input[Dataset],
        teacher: Input[Model],
        checkpoint_root: str,
        accelerator_type: str,
        accelerator_count: int,
        publish_uri: str,
    ):
        """Stages 3-5 for one teacher artifact."""
        student = distill(
            config=config,
            dataset=dataset,
            teacher=teacher,
            checkpoint_root=checkpoint_root,
            accelerator=accelerator_type,
            num_accelerators=accelerator_count,
            trainjob_image=cuda_image,
        )
        on_gpu_pool(student.set_display_name("distill"), accelerator_type, accelerator_count, launcher=k.num_nodes > 1)
        report = evaluate(config=config, dataset=dataset, teacher=teacher, student=student.outputs["student"])
        report.set_display_name("evaluate").set_container_image(cpu_image)
        if cfg.eval.on_gpu:  # one GPU of the pool: teacher and student over the whole test set
            on_gpu_pool(report, accelerator_type, 1)
        with dsl.If(report.outputs["gate_passed"] == True, name="quality-gate-passed"):  # noqa: E712
            exported = export(
                config=config,
                dataset=dataset,
                teacher=teacher,
                student=student.outputs["student"],
                report=report.outputs["report"],
                publish_uri=publish_uri,
            )
            exported.set_display_name("export onnx").set_container_image(cpu_image)
            exported.set_caching_options(False)  # publishing is a side effect: never skip it
        with dsl.Else(name="quality-gate-failed"):
            stop = quality_gate_stop(reason=report.outputs["gate_reason"])
            stop.set_display_name("quality gate: stop").set_container_image(cpu_image)
            stop.set_caching_options(False)

    # The UI parameters are the config keys declared `setting(parameter=...)`: this signature lists them
    # (KFP reads it) with the preset's values; tests/pipelines/test_parameters.py proves it equals the
    # declaration, and the data prep task refuses any difference at run time.
    @dsl.pipeline(name=PIPELINE_NAME, description=f"funmatch distillation ({cfg.preset}): {cfg.description}")
    def funmatch(
        config_json: str = cfg.to_json(),
        data_source: str = cfg.data.source,
        teacher_arch: str = t.arch,
        teacher_init: str = t.init,
        teacher_resolution: int = t.resolution,
        teacher_finetune: bool = t.finetune,
        student_arch: str = s.arch,
        student_resolution: int = s.resolution,
        distill_setup: str = k.setup,
        distill_epochs: float = k.epochs,
        distill_batch_size: int = k.batch_size,
        distill_lr: float = k.lr,
        distill_weight_decay: float = k.weight_decay,
        distill_temperature: float = k.temperature,
        accelerator_type: str = r.accelerator_type,
        accelerator_count: int = r.accelerator_count,
        checkpoint_root: str = cfg.runtime.checkpoint_dir,
        publish_uri: str = "",
    ):
        arguments = locals()
        ui = {name: arguments[name] for name in pipeline_parameters()}
        prep = prepare_data(config_json=config_json, **ui)
        prep.set_display_name("data prep").set_container_image(cpu_image)
        resolved, dataset = prep.outputs["config"], prep.outputs["dataset"]
        rest = dict(
            config=resolved,
            dataset=dataset,
            checkpoint_root=checkpoint_root,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
            publish_uri=publish_uri,
        )

        with dsl.If(teacher_finetune == True, name="fine-tune-teacher"):  # noqa: E712 (a pipeline condition)
            trained = train_teacher(
                config=resolved, dataset=dataset, accelerator=accelerator_type, num_accelerators=accelerator_count
            )
            on_gpu_pool(trained.set_display_name("teacher fine-tune"), accelerator_type, accelerator_count)
            distill_evaluate_export(teacher=trained.outputs["teacher"], **rest)
        with dsl.Else(name="given-teacher"):
            given = given_teacher(config=resolved, dataset=dataset)
            given.set_display_name("given teacher").set_container_image(cpu_image)
            distill_evaluate_export(teacher=given.outputs["teacher"], **rest)

    return funmatch


def compile_pipeline(cfg: Config, path: str) -> str:
    """Writes the KFP IR YAML that a user uploads in the Kubeflow UI."""
    compiler.Compiler().compile(build(cfg), path)
    return path
