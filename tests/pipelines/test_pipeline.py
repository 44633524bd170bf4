"""The compiled IR and the whole DAG through kfp.local."""

import json
import time

import pytest
import yaml

from funmatch import config
from funmatch.app import cli
from funmatch.errors import ConfigError
from pipelines.funmatch_pipeline import compile_pipeline

CHECKPOINTS = "runtime.checkpoint_dir=gs://funmatch-test/checkpoints"
GPU_PRESET = "pets-fast"  # any preset with resources.accelerator_count >= 1


def _compiled(path, cfg, **kwargs) -> tuple[dict, dict]:
    compile_pipeline(cfg, str(path), **kwargs)
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs[0], (docs[1:] or [{"platforms": {"kubernetes": {"deploymentSpec": {"executors": {}}}}}])[0]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    spec, platform = _compiled(tmp_path_factory.mktemp("ir") / "pipeline.yaml", config.load(GPU_PRESET, [CHECKPOINTS]))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> list[dict]:
    """Every task of every DAG (the root's included)."""
    return [t for c in [spec["root"], *spec["components"].values()] for t in c.get("dag", {}).get("tasks", {}).values()]


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
        assert int(c["activeDeadlineSeconds"]) == config.load(GPU_PRESET).resources.timeout_hours * 3600
    for name in set(execs) - gpu:
        assert "cpu" in execs[name]["container"]["image"]
    for e in execs.values():
        assert "pip install" not in " ".join(e["container"]["command"])  # install_kfp_package=False


def test_ir_parameters_have_the_presets_defaults(ir):
    spec, _ = ir
    params = spec["root"]["inputDefinitions"]["parameters"]
    cfg = config.load(GPU_PRESET, [CHECKPOINTS])
    assert params["distill_epochs"]["defaultValue"] == cfg.distill.epochs
    assert params["teacher_arch"]["defaultValue"] == cfg.teacher.arch
    assert params["accelerator_count"] == {"defaultValue": "1", "isOptional": True, "parameterType": "STRING"}
    assert json.loads(params["config_json"]["defaultValue"]) == cfg.to_dict()
    assert all("defaultValue" in p for p in params.values())


def test_ir_teacher_condition_and_retries(ir):
    spec, k8s = ir
    text = json.dumps(spec)
    assert "teacher_finetune" in text and "triggerPolicy" in text
    cfg = config.load(GPU_PRESET)
    retry = [t["retryPolicy"] for t in _tasks(spec) if t.get("retryPolicy")]
    assert len(retry) == 3 and {r["maxRetryCount"] for r in retry} == {cfg.resources.retries}
    assert {r["backoffMaxDuration"] for r in retry} == {f"{config.retry_window_s(cfg)}s"}
    assert {k8s[e]["activeDeadlineSeconds"] for e in k8s} == {str(int(cfg.resources.timeout_hours * 3600))}


def test_cluster_compile_of_a_gpu_preset_needs_gs_checkpoints(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    with pytest.raises(ConfigError, match=r"^runtime\.checkpoint_dir='/ckpt' is not allowed .* gs://"):
        compile_pipeline(config.load("imagenet", ["runtime.checkpoint_dir=/ckpt"]), str(path))
    assert not path.exists()  # refused before anything is written
    assert cli.main(["compile", "--preset", "imagenet", "--output", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "runtime.checkpoint_dir" in err and "gs://BUCKET" in err, err
    assert not path.exists()
    compile_pipeline(config.load("imagenet"), str(path), target="local")  # kfp.local needs none
    compile_pipeline(config.load("demo"), str(path))  # nor does a CPU config
    # with one, every distill task resumes from it: tests/pipelines/test_backend_contract.py


def test_caching_off_compiles_every_task_uncached(tmp_path):
    spec, _ = _compiled(tmp_path / "p.yaml", config.load(GPU_PRESET, [CHECKPOINTS]), caching=False)
    cached = [t["taskInfo"]["name"] for t in _tasks(spec) if t.get("cachingOptions", {}).get("enableCache")]
    assert cached == [] and len([t for t in _tasks(spec) if "cachingOptions" in t]) >= 8
    spec, _ = _compiled(tmp_path / "p.yaml", config.load(GPU_PRESET, [CHECKPOINTS]))
    assert {t["taskInfo"]["name"] for t in _tasks(spec) if t.get("cachingOptions", {}).get("enableCache")} >= {
        "data prep",
        "distill",
    }


def test_cpu_config_sends_nothing_to_the_gpu_pool(tmp_path):
    spec, platform = _compiled(tmp_path / "p.yaml", config.load("demo"))
    execs = spec["deploymentSpec"]["executors"]
    assert not any(e["container"].get("resources", {}).get("accelerator") for e in execs.values())
    assert all("funmatch-cpu" in e["container"]["image"] for e in execs.values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {"exec-train-teacher", "exec-distill", "exec-distill-2"}  # a deadline each, no GPU node
    assert all(set(c) == {"activeDeadlineSeconds"} for c in k8s.values())
    distill = next(t for t in _tasks(spec) if t["componentRef"]["name"] == "comp-distill")
    assert distill["inputs"]["parameters"]["num_accelerators"] == {"runtimeValue": {"constant": "0"}}


@pytest.mark.slow
def test_whole_dag_runs_locally_and_reruns_from_cache(tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["run", "--preset", "demo-tiny", "--output", str(tmp_path / "run")]) == 0
    first = time.perf_counter() - start
    serving = ("serving/funmatch/config.pbtxt", "serving/funmatch/1/model.onnx", "inferenceservice.yaml")
    for name in ("model.onnx", "model.json", "metrics.json", "pipeline.yaml", "SHA256SUMS", *serving):
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


@pytest.mark.parametrize("preset", ["demo", GPU_PRESET, "imagenet"])
def test_ir_every_parameter_reference_resolves(tmp_path, preset):
    """Each task input read from its DAG's inputs names an input the DAG has, and every parameter a GPU
    request reads is an input of the tasks that make it (the KFP gap worked around in the README)."""
    import re

    spec, _ = _compiled(tmp_path / "p.yaml", config.load(preset, [CHECKPOINTS]))
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
    # demo: a CPU config; teacher fine-tune + distill ×2 branches; ImageNet also evaluates on the GPU pool (×2)
    assert gpu_tasks == {"demo": 0, GPU_PRESET: 3, "imagenet": 5}[preset]
