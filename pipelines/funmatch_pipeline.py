"""The DAG: data prep → teacher (fine-tune, or the given one) → distill → evaluate → export.

`build(cfg)` returns a KFP pipeline whose parameters default to `cfg`'s values: the knobs a user
changes in the Kubeflow UI, plus the whole resolved config as `config_json`. The teacher stage is a
`dsl.If` on `teacher_finetune`: fine-tune, or else take the given teacher. Stages 3-5 form one
sub-pipeline that each branch calls with its teacher artifact (kfp.local cannot yet route an
artifact through `dsl.OneOf`). The teacher and distill tasks (and evaluate with `eval.on_gpu`) get a
deadline and retries derived from the preset's budget (`funmatch.config.task_timeout_hours`,
`retry_window_s`) and, when the config asks for GPUs (`resources.accelerator_count` >= 1), the GPU pool:
accelerator type and count as STRING parameters (what the KFP driver can resolve), node selector,
toleration, memory-backed /dev/shm. A CPU config (demo, smoke variants) sends nothing to the GPU pool.
kfp.local ignores all of it. Export publishes to `publish_uri` when it is set.
"""

import math

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
from funmatch.config import (
    RETRY_BACKOFF_FACTOR,
    RETRY_BACKOFF_S,
    Config,
    pipeline_defaults,
    pipeline_parameters,
    retry_window_s,
)
from funmatch.errors import ConfigError

PIPELINE_NAME = "funmatch"
TARGETS = ("cluster", "local")


def build(cfg: Config, caching: bool = True):
    """The pipeline function for `cfg` (its defaults are the preset's values); `caching=False`: no task is
    served from KFP's cache."""
    k, r, ui_default = cfg.distill, cfg.resources, pipeline_defaults(cfg)
    cpu_image, cuda_image = image("cpu", r.image), image("cuda", r.image)
    gpu = r.accelerator_count >= 1  # else a CPU config: nothing goes to the GPU pool
    long_image = cuda_image if gpu else cpu_image

    def on_cpu(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        """A short CPU task."""
        return task.set_display_name(name).set_container_image(cpu_image).set_caching_options(caching)

    def long_running(
        task: dsl.PipelineTask, name: str, accelerator_type, accelerator_count, launcher: bool = False
    ) -> dsl.PipelineTask:  # accelerator_type/count: pipeline parameters (STRING) or literals
        """A training task: deadline and retries (a preempted or failed attempt exits after checkpointing and
        the next resumes from checkpoint_root), and with a GPU config the GPU pool; `launcher`: the task only
        starts a multi-node TrainJob, so no GPUs for it."""
        task.set_display_name(name).set_container_image(long_image).set_caching_options(caching)
        kubernetes.set_timeout(task, math.ceil(r.timeout_hours * 3600))
        task.set_retry(
            num_retries=r.retries,
            backoff_duration=f"{RETRY_BACKOFF_S}s",
            backoff_factor=float(RETRY_BACKOFF_FACTOR),
            backoff_max_duration=f"{retry_window_s(cfg)}s",
        )
        if launcher or not gpu:
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
        accelerator_count: str,
        publish_uri: str,
    ):
        """Stages 3-5 for one teacher artifact."""
        student = distill(
            config=config,
            dataset=dataset,
            teacher=teacher,
            checkpoint_root=checkpoint_root,
            accelerator=accelerator_type,
            num_accelerators=accelerator_count if gpu else "0",
            trainjob_image=long_image,
        )
        long_running(student, "distill", accelerator_type, accelerator_count, launcher=k.num_nodes > 1)
        report = evaluate(config=config, dataset=dataset, teacher=teacher, student=student.outputs["student"])
        if cfg.eval.on_gpu and gpu:  # one GPU of the pool: teacher and student over the whole test set
            long_running(report, "evaluate", accelerator_type, 1)
        else:
            on_cpu(report, "evaluate")
        with dsl.If(report.outputs["gate_passed"] == True, name="quality-gate-passed"):  # noqa: E712
            exported = export(
                config=config,
                dataset=dataset,
                teacher=teacher,
                student=student.outputs["student"],
                report=report.outputs["report"],
                publish_uri=publish_uri,
            )
            on_cpu(exported, "export onnx").set_caching_options(False)  # publishing is a side effect: never skip it
        with dsl.Else(name="quality-gate-failed"):
            stop = quality_gate_stop(reason=report.outputs["gate_reason"])
            on_cpu(stop, "quality gate: stop").set_caching_options(False)

    # The UI parameters are the config keys declared `setting(parameter=...)`: this signature lists them
    # (KFP reads it) with the preset's values as their declared types (`pipeline_defaults`);
    # tests/pipelines/test_parameters.py proves it equals the declaration, and the data prep task refuses
    # any difference at run time.
    @dsl.pipeline(name=PIPELINE_NAME, description=f"funmatch distillation ({cfg.preset}): {cfg.description}")
    def funmatch(
        config_json: str = cfg.to_json(),
        data_source: str = ui_default["data_source"],
        teacher_arch: str = ui_default["teacher_arch"],
        teacher_init: str = ui_default["teacher_init"],
        teacher_resolution: int = ui_default["teacher_resolution"],
        teacher_finetune: bool = ui_default["teacher_finetune"],
        student_arch: str = ui_default["student_arch"],
        student_resolution: int = ui_default["student_resolution"],
        distill_setup: str = ui_default["distill_setup"],
        distill_epochs: float = ui_default["distill_epochs"],
        distill_batch_size: int = ui_default["distill_batch_size"],
        distill_lr: float = ui_default["distill_lr"],
        distill_weight_decay: float = ui_default["distill_weight_decay"],
        distill_temperature: float = ui_default["distill_temperature"],
        accelerator_type: str = ui_default["accelerator_type"],
        accelerator_count: str = ui_default["accelerator_count"],  # STRING: it feeds the GPU limit
        checkpoint_root: str = cfg.runtime.checkpoint_dir,
        publish_uri: str = "",
    ):
        arguments = locals()
        ui = {name: arguments[name] for name in pipeline_parameters()}
        prep = on_cpu(prepare_data(config_json=config_json, **ui), "data prep")
        resolved, dataset = prep.outputs["config"], prep.outputs["dataset"]
        rest = {
            "config": resolved,
            "dataset": dataset,
            "checkpoint_root": checkpoint_root,
            "accelerator_type": accelerator_type,
            "accelerator_count": accelerator_count,
            "publish_uri": publish_uri,
        }

        with dsl.If(teacher_finetune == True, name="fine-tune-teacher"):  # noqa: E712 (a pipeline condition)
            trained = train_teacher(
                config=resolved,
                dataset=dataset,
                accelerator=accelerator_type,
                num_accelerators=accelerator_count if gpu else "0",
            )
            long_running(trained, "teacher fine-tune", accelerator_type, accelerator_count)
            distill_evaluate_export(teacher=trained.outputs["teacher"], **rest).set_caching_options(caching)
        with dsl.Else(name="given-teacher"):
            given = on_cpu(given_teacher(config=resolved, dataset=dataset), "given teacher")
            distill_evaluate_export(teacher=given.outputs["teacher"], **rest).set_caching_options(caching)

    return funmatch


def check_cluster(cfg: Config) -> None:
    """A GPU config on a cluster must checkpoint to gs://: a retried or preempted GPU task resumes from
    there (a pod's disk does not outlive it, and a TrainJob's nodes share none)."""
    ckpt = cfg.runtime.checkpoint_dir
    if cfg.resources.accelerator_count >= 1 and not ckpt.startswith("gs://"):
        raise ConfigError(
            f"runtime.checkpoint_dir={ckpt!r} is not allowed for a GPU run on a cluster: expected a gs:// prefix "
            "that retries and preemptions resume from (--set runtime.checkpoint_dir=gs://BUCKET/checkpoints)"
        )


def compile_pipeline(cfg: Config, path: str, *, target: str = "cluster", caching: bool = True) -> str:
    """Writes the KFP IR YAML that a user uploads in the Kubeflow UI. `target="cluster"` refuses a GPU
    config without a gs:// checkpoint root (`check_cluster`) before writing anything; "local" (kfp.local)
    does not need one. `caching=False`: every task runs again (scheduled retraining must retrain)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    if target == "cluster":
        check_cluster(cfg)
    compiler.Compiler().compile(build(cfg, caching), path)
    return path
