"""The compiled IR and the whole DAG through kfp.local."""

import json
import time

import pytest
import yaml

from funmatch import config
from funmatch.app import cli
from pipelines.funmatch_pipeline import compile_pipeline


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    compile_pipeline(config.load("demo"), str(path))
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_ir_has_the_stages_and_gpu_settings_on_the_two_gpu_tasks(ir):
    spec, k8s = ir
    execs = spec["deploymentSpec"]["executors"]
    # stages 3-5 appear once per teacher branch (exec-distill and exec-distill-2, ...)
    assert {n.removesuffix("-2") for n in execs} == {
        "exec-prepare-data",
        "exec-train-teacher",
        "exec-given-teacher",
        "exec-distill",
        "exec-evaluate",
        "exec-export",
        "exec-quality-gate-stop",
    }
    gpu = {n for n, e in execs.items() if e["container"].get("resources", {}).get("accelerator")}
    assert gpu == {"exec-train-teacher", "exec-distill", "exec-distill-2"}
    distill_tasks = [
        t
        for c in spec["components"].values()
        for t in c.get("dag", {}).get("tasks", {}).values()
        if t["componentRef"]["name"] in ("comp-distill", "comp-distill-2")
    ]
    assert {t["inputs"]["parameters"]["trainjob_image"]["runtimeValue"]["constant"] for t in distill_tasks} == {
        execs["exec-distill"]["container"]["image"]
    }  # a TrainJob's pods run the distill task's image
    for name in gpu:
        acc = execs[name]["container"]["resources"]["accelerator"]
        assert "accelerator_count" in acc["resourceCount"] and "accelerator_type" in acc["resourceType"]
        assert "cuda" in execs[name]["container"]["image"]
        c = k8s[name]
        assert c["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert c["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert c["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and c["emptyDirMounts"][0]["medium"] == "Memory"
        assert int(c["activeDeadlineSeconds"]) >= 7 * 24 * 3600
    for name in set(execs) - gpu:
        assert "cpu" in execs[name]["container"]["image"]
    for name, e in execs.items():
        assert "pip install" not in " ".join(e["container"]["command"])  # install_kfp_package=False


def test_ir_parameters_have_the_presets_defaults(ir):
    spec, _ = ir
    params = spec["root"]["inputDefinitions"]["parameters"]
    cfg = config.load("demo")
    assert params["distill_epochs"]["defaultValue"] == cfg.distill.epochs
    assert params["teacher_arch"]["defaultValue"] == cfg.teacher.arch
    assert params["accelerator_count"]["defaultValue"] == 1
    assert json.loads(params["config_json"]["defaultValue"]) == cfg.to_dict()
    assert all("defaultValue" in p for p in params.values())


def test_ir_teacher_condition_and_retries(ir):
    spec, _ = ir
    text = json.dumps(spec)
    assert "teacher_finetune" in text and "triggerPolicy" in text
    retry = [
        t
        for c in spec["components"].values()
        for t in c.get("dag", {}).get("tasks", {}).values()
        if t.get("retryPolicy")
    ]
    assert len(retry) >= 3 and retry[0]["retryPolicy"]["maxRetryCount"] == 5


@pytest.mark.slow
def test_whole_dag_runs_locally_and_reruns_from_cache(tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["run", "--preset", "demo-tiny", "--output", str(tmp_path / "run")]) == 0
    first = time.perf_counter() - start
    for name in ("model.onnx", "model.json", "metrics.json", "pipeline.yaml", "SHA256SUMS"):
        assert (tmp_path / "run" / name).exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["export/onnx_max_abs_diff"] <= 1e-3 and metrics["wall_s"] > 0
    assert "student/test/agree@1" in metrics
    out = capsys.readouterr().out
    assert "model.onnx" in out and len(out.splitlines()) <= 10, out  # one line per task and the summary
    assert "executor_input" in (tmp_path / "run" / "run.log").read_text()  # kfp.local's whole output

    start = time.perf_counter()
    assert cli.main(["run", "--preset", "demo-tiny", "--output", str(tmp_path / "run")]) == 0
    assert time.perf_counter() - start < first  # finished stages come from the cache
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["student/test/prec@1"]
        == metrics["student/test/prec@1"]
    )


@pytest.mark.slow
def test_given_teacher_branch_runs_locally(tmp_path, teacher_dir):
    weights = teacher_dir / "member-0.safetensors"
    argv = [
        "run",
        "--preset",
        "demo-tiny",
        "--output",
        str(tmp_path / "run"),
        "--set",
        "teacher.finetune=false",
        "--set",
        f"teacher.init={weights}",
        "--set",
        "distill.epochs=0.05",
        "--set",
        "distill.warmup_steps=1",
    ]
    assert cli.main(argv) == 0
    assert not list((tmp_path / "run" / "pipeline_root").glob("*/train-teacher"))
    assert (tmp_path / "run" / "model.onnx").exists()


@pytest.mark.slow
def test_quality_gate_in_ir_and_stop_says_why(ir, tmp_path, capsys):
    spec, _ = ir
    text = json.dumps(spec)
    assert "gate_passed" in text and "exec-quality-gate-stop" in spec["deploymentSpec"]["executors"]
    argv = [
        "run",
        "--preset",
        "demo-tiny",
        "--output",
        str(tmp_path / "run"),
        "--set",
        "gate.min_student_acc=0.99",
        "--set",
        "distill.epochs=0.05",
        "--set",
        "distill.warmup_steps=1",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error: the quality gate stopped the run before export: student test prec@1")
    assert "gate.min_student_acc=0.99" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "model.onnx").exists()  # nothing exported or published


@pytest.mark.parametrize("preset", ["demo", "imagenet"])
def test_ir_every_parameter_reference_resolves(tmp_path, preset):
    """Each task input read from its DAG's inputs names an input the DAG has, and every parameter a GPU
    request reads is an input of the tasks that make it (the KFP gap worked around in the README)."""
    import re

    compile_pipeline(config.load(preset), str(tmp_path / "p.yaml"))
    spec = next(d for d in yaml.safe_load_all((tmp_path / "p.yaml").read_text()) if d)
    components = spec["components"] | {"root": spec["root"]}
    gpu_tasks = 0
    for name, comp in components.items():
        defined = set(comp.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in comp.get("dag", {}).get("tasks", {}).items():
            inputs = task.get("inputs", {}).get("parameters", {})
            for key, value in inputs.items():
                ref = value.get("componentInputParameter")
                assert ref is None or ref in defined, (name, task_name, key, ref)
            label = components[task["componentRef"]["name"]].get("executorLabel")
            resources = spec["deploymentSpec"]["executors"].get(label, {}).get("container", {}).get("resources", {})
            for param in re.findall(r"inputs\.parameters\['([^']+)'\]", json.dumps(resources)):
                assert param in inputs, (task_name, param)
            gpu_tasks += bool(resources.get("accelerator"))
    # teacher fine-tune + distill ×2 branches; ImageNet also evaluates on the GPU pool (×2 branches)
    assert gpu_tasks == {"demo": 3, "imagenet": 5}[preset]
