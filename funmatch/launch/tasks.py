"""Entry points of the pipeline tasks: what each KFP adapter in `components/` calls, once.

Arguments are plain values and artifact objects (anything with `.path` and `.metadata`, and for
metrics `.log_metric` / `.log_confusion_matrix`), so this module needs no KFP import and the same
functions run in-process in tests. The config travels as one JSON string; the first task applies
the pipeline's UI parameters to it, validates it, and hands the resolved JSON downstream.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from funmatch import config

# Pipeline parameter name -> config key: the knobs a user changes in the Kubeflow UI.
UI_PARAMETERS = {
    "data_source": "data.source",
    "teacher_arch": "teacher.arch",
    "teacher_init": "teacher.init",
    "teacher_resolution": "teacher.resolution",
    "teacher_finetune": "teacher.finetune",
    "student_arch": "student.arch",
    "student_resolution": "student.resolution",
    "distill_setup": "distill.setup",
    "distill_epochs": "distill.epochs",
    "distill_batch_size": "distill.batch_size",
    "distill_lr": "distill.lr",
    "distill_weight_decay": "distill.weight_decay",
    "distill_temperature": "distill.temperature",
    "accelerator_type": "resources.accelerator_type",
    "accelerator_count": "resources.accelerator_count",
}


def resolve_config(config_json: str, parameters: dict[str, Any]) -> config.Config:
    """The pipeline's config with its UI parameters applied and validated."""
    cfg = config.from_json(config_json)
    config.apply_overrides(cfg, {UI_PARAMETERS[k]: v for k, v in parameters.items()})
    config.validate(cfg)
    return cfg


def prepare_data(config_json: str, parameters: dict[str, Any], dataset) -> str:
    """Data prep task; returns the resolved config JSON for the downstream tasks."""
    from funmatch.stages import prepare

    cfg = resolve_config(config_json, parameters)
    manifest = prepare.run(cfg, dataset.path)
    dataset.metadata.update({"classes": manifest["num_classes"], "stored_resolution": manifest["stored_resolution"],
                             "encoding": manifest["encoding"], "skipped": manifest["skipped"]["count"], "wall_s": manifest["wall_s"],
                             **{f"{s}_count": manifest["splits"][s]["count"] for s in manifest["splits"]}})
    return cfg.to_json()


def _on_accelerators(config_json: str, accelerator_type: str, accelerator_count: int) -> config.Config:
    """The config with the task's accelerator request recorded (the task's resources come from it)."""
    cfg = config.from_json(config_json)
    return config.apply_overrides(cfg, {"resources.accelerator_type": accelerator_type,
                                        "resources.accelerator_count": accelerator_count})


def train_teacher(config_json: str, dataset, accelerator: str, num_accelerators: int, teacher) -> None:
    from funmatch.stages import finetune

    cfg = _on_accelerators(config_json, accelerator, num_accelerators)
    info = finetune.run(cfg, dataset.path, teacher.path)
    teacher.metadata.update({k: info[k] for k in ("arch", "resolution", "val_prec1", "wall_s")})


def given_teacher(config_json: str, dataset, teacher) -> None:
    from funmatch.stages import finetune

    info = finetune.given_teacher(config.from_json(config_json), dataset.path, teacher.path)
    teacher.metadata.update({k: info[k] for k in ("arch", "resolution", "init", "wall_s")})


def distill(config_json: str, dataset, teacher, checkpoint_root: str, accelerator: str,
            num_accelerators: int, student) -> None:
    from funmatch.stages import distill as stage

    cfg = _on_accelerators(config_json, accelerator, num_accelerators)
    ckpt = f"{checkpoint_root.rstrip('/')}/{cfg.hash()}/distill" if checkpoint_root else ""
    if cfg.distill.num_nodes > 1:  # a Kubeflow Trainer TrainJob trains; this task waits and copies the student
        from components import image  # stdlib-only module: the CUDA image the GPU tasks run
        from funmatch.launch import trainjob

        info = trainjob.launch_distill(cfg, dataset, teacher, student, checkpoint_root, ckpt,
                                       image=image("cuda", cfg.resources.image))
    elif num_accelerators > 1:  # one node, several GPUs: one process per GPU, the student under DDP
        info = torchrun_distill(cfg, dataset.path, teacher.path, student.path, ckpt, num_accelerators)
    else:
        info = stage.run(cfg, dataset.path, teacher.path, student.path, checkpoint_dir=ckpt)
    student.metadata.update({k: info[k] for k in ("arch", "resolution", "setup", "steps", "wall_s")})


def torchrun_distill(cfg: config.Config, dataset: str, teacher: str, out: str, checkpoint_dir: str,
                     nproc: int) -> dict:
    """`torchrun --standalone --nproc_per_node=N funmatch stage distill ...`; returns the student info."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "funmatch", "stage", "distill", "--config-json", cfg.to_json(), "--dataset", dataset,
           "--teacher", teacher, "--output", out, "--checkpoint-dir", checkpoint_dir]
    result = subprocess.run(cmd)
    if result.returncode:
        raise SystemExit(result.returncode)  # e.g. 143 after a preemption checkpoint: the task retry resumes
    return json.loads((Path(out) / "model.json").read_text())


def evaluate(config_json: str, dataset, teacher, student, metrics, classification, report, html) -> tuple[bool, str]:
    """Evaluation task; returns the quality gate's (passed, reason)."""
    from funmatch.stages import evaluate as stage

    values = stage.run(config.from_json(config_json), dataset.path, teacher.path, student.path, report.path)
    for key, value in values.items():
        metrics.log_metric(key.replace("@", "_at_"), value)  # KFP metric names: no '@'
    confusion = json.loads((Path(report.path) / "confusion.json").read_text())
    classification.log_confusion_matrix(confusion["classes"], confusion["matrix"])
    Path(metrics.path).write_text(json.dumps(values))  # a file, so kfp.local's cache sees the output
    Path(classification.path).write_text(json.dumps(confusion))
    Path(html.path).write_text((Path(report.path) / "report.html").read_text())
    verdict = json.loads((Path(report.path) / "gate.json").read_text())
    return verdict["passed"], verdict["reason"]


def quality_gate_stop(reason: str) -> None:
    from funmatch.errors import FunmatchError

    raise FunmatchError(f"quality gate: not exported or published: {reason}")


def export(config_json: str, dataset, teacher, student, report, publish_uri: str, model) -> None:
    from funmatch.stages import export as stage

    walls = {"prepare": dataset.metadata.get("wall_s", 0.0), "teacher": teacher.metadata.get("wall_s", 0.0),
             "distill": student.metadata.get("wall_s", 0.0)}
    values = stage.run(config.from_json(config_json), dataset.path, student.path,
                       Path(report.path) / "metrics.json", model.path, walls)
    model.metadata.update({"student_test_prec1": values["student/test/prec@1"],
                           "onnx_max_abs_diff": values["export/onnx_max_abs_diff"]})
    if publish_uri:
        model.metadata["published"] = stage.publish(model.path, publish_uri)  # a registry URI gets a version
