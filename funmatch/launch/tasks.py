"""Entry points of the pipeline tasks: what each KFP adapter in `components/` calls, once.

Arguments are plain values and artifact objects (anything with `.path` and `.metadata`, and for
metrics `.log_metric` / `.log_confusion_matrix`), so this module needs no KFP import and the same
functions run in-process in tests. The config travels as one JSON string; the first task applies
the pipeline's UI parameters to it, validates it, and hands the resolved JSON downstream. Stages
return their results; the writing of task outputs happens here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from funmatch import config
from funmatch.errors import ConfigError, QualityGateStop
from funmatch.stages import distill as distill_stage
from funmatch.stages import evaluate as evaluate_stage
from funmatch.stages import export as export_stage
from funmatch.stages import finetune, prepare


def resolve_config(config_json: str, parameters: dict[str, Any]) -> config.Config:
    """The pipeline's config with its UI parameters applied and validated. `parameters` must name
    exactly the declared pipeline parameters (`config.pipeline_parameters()`): none is dropped."""
    declared = config.pipeline_parameters()
    if set(parameters) != set(declared):
        missing, unknown = sorted(set(declared) - set(parameters)), sorted(set(parameters) - set(declared))
        raise ConfigError(f"pipeline parameters do not match the config's: missing {missing}, unknown {unknown}")
    cfg = config.from_json(config_json)
    config.apply_overrides(cfg, {declared[k]: v for k, v in parameters.items()})
    config.validate(cfg)
    return cfg


def prepare_data(config_json: str, parameters: dict[str, Any], dataset) -> str:
    """Data prep task; returns the resolved config JSON for the downstream tasks."""
    cfg = resolve_config(config_json, parameters)
    manifest = prepare.run(cfg, dataset.path)
    dataset.metadata.update(
        {
            "classes": manifest["num_classes"],
            "stored_resolution": manifest["stored_resolution"],
            "encoding": manifest["encoding"],
            "skipped": manifest["skipped"]["count"],
            "wall_s": manifest["wall_s"],
            **{f"{s}_count": manifest["splits"][s]["count"] for s in manifest["splits"]},
        }
    )
    return cfg.to_json()


def _on_accelerators(config_json: str, accelerator_type: str, accelerator_count: int) -> config.Config:
    """The config with the task's accelerator request recorded (the task's resources come from it)."""
    cfg = config.from_json(config_json)
    return config.apply_overrides(
        cfg, {"resources.accelerator_type": accelerator_type, "resources.accelerator_count": accelerator_count}
    )


def train_teacher(config_json: str, dataset, accelerator: str, num_accelerators: int, teacher) -> None:
    cfg = _on_accelerators(config_json, accelerator, num_accelerators)
    info = finetune.run(cfg, dataset.path, teacher.path)
    teacher.metadata.update({k: info[k] for k in ("arch", "resolution", "val_prec1", "wall_s")})


def given_teacher(config_json: str, dataset, teacher) -> None:
    info = finetune.given_teacher(config.from_json(config_json), dataset.path, teacher.path)
    teacher.metadata.update({k: info[k] for k in ("arch", "resolution", "init", "wall_s")})


def distill(
    config_json: str,
    dataset,
    teacher,
    checkpoint_root: str,
    accelerator: str,
    num_accelerators: int,
    trainjob_image: str,
    student,
) -> None:
    """Distils on this task's accelerators; `distill.num_nodes > 1`: a Kubeflow Trainer TrainJob of
    `trainjob_image` (the image this task runs) trains, and this task waits and copies the student."""
    cfg = _on_accelerators(config_json, accelerator, num_accelerators)
    ckpt = f"{checkpoint_root.rstrip('/')}/{cfg.hash()}/distill" if checkpoint_root else ""
    if cfg.distill.num_nodes > 1:
        from funmatch.launch import trainjob  # kubeflow-trainer-api: only for multi-node runs

        info = trainjob.launch_distill(cfg, dataset, teacher, student, checkpoint_root, ckpt, image=trainjob_image)
    elif num_accelerators > 1:  # one node, several GPUs: one process per GPU, the student under DDP
        info = torchrun_distill(cfg, dataset.path, teacher.path, student.path, ckpt, num_accelerators)
    else:
        info = distill_stage.run(cfg, dataset.path, teacher.path, student.path, checkpoint_dir=ckpt)
    student.metadata.update({k: info[k] for k in ("arch", "resolution", "setup", "steps", "wall_s")})


def torchrun_command(
    cfg: config.Config, dataset: str, teacher: str, out: str, checkpoint_dir: str, nproc: int
) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N funmatch stage distill ...` as an argv."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "funmatch",
        "stage",
        "distill",
        "--config-json",
        cfg.to_json(),
        "--dataset",
        dataset,
        "--teacher",
        teacher,
        "--output",
        out,
        "--checkpoint-dir",
        checkpoint_dir,
    ]


def torchrun_distill(cfg: config.Config, dataset: str, teacher: str, out: str, checkpoint_dir: str, nproc: int) -> dict:
    """Distils with one process per GPU under torchrun (`torchrun_command`); returns the student info."""
    cmd = torchrun_command(cfg, dataset, teacher, out, checkpoint_dir, nproc)
    result = subprocess.run(cmd, check=False)
    if result.returncode:
        raise SystemExit(result.returncode)  # e.g. 143 after a preemption checkpoint: the task retry resumes
    return json.loads((Path(out) / "model.json").read_text())


def evaluate(config_json: str, dataset, teacher, student, metrics, classification, report, html) -> tuple[bool, str]:
    """Evaluation task; returns the quality gate's (passed, reason). The report artifact holds every
    figure; the Metrics and ClassificationMetrics artifacts (what the Kubeflow UI draws) get the
    UI-sized view, capped above evaluate_stage.UI_MAX_CLASSES classes."""
    result = evaluate_stage.run(config.from_json(config_json), dataset.path, teacher.path, student.path)
    result.write(report.path)
    ui = result.ui_view()
    for key, value in ui.metrics.items():
        metrics.log_metric(key.replace("@", "_at_"), value)  # KFP metric names: no '@'
    if ui.classes:  # data.labels=none: no confusion matrix
        classification.log_confusion_matrix(ui.classes, ui.confusion)
    Path(metrics.path).write_text(json.dumps(ui.metrics))  # a file, so kfp.local's cache sees the output
    Path(classification.path).write_text(json.dumps({"classes": ui.classes, "matrix": ui.confusion}))
    Path(html.path).write_text(result.report_html)
    return result.gate_passed, result.gate_reason


def quality_gate_stop(reason: str) -> None:
    raise QualityGateStop(reason)


def export(config_json: str, dataset, teacher, student, report, publish_uri: str, model) -> None:
    walls = {
        "prepare": dataset.metadata.get("wall_s", 0.0),
        "teacher": teacher.metadata.get("wall_s", 0.0),
        "distill": student.metadata.get("wall_s", 0.0),
    }
    evaluation = json.loads((Path(report.path) / "metrics.json").read_text())  # the evaluate task's artifact
    result = export_stage.run(config.from_json(config_json), dataset.path, student.path, evaluation, model.path, walls)
    model.metadata.update(result.metadata())
    if publish_uri:
        model.metadata["published"] = export_stage.publish_result(model.path, publish_uri)  # registries: a version
