"""What the KFP backend and Argo do with the compiled IR, which kfp.local never shows, checked on the IR of
every preset (GPU presets with the gs:// checkpoint root a cluster compile requires) and every smoke variant.

Each rule mirrors upstream code, read at kubeflow/pipelines 7b70c7b9 and argoproj/argo-workflows f016ad89,
and each is shown to fail on a copy of the IR this DAG compiled before (BROKEN: a NUMBER parameter feeding
the GPU count, backoff maxDuration 3600s on a 14-day deadline, GPU requests in the CPU demo).
"""

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from funmatch import config
from pipelines.funmatch_pipeline import compile_pipeline

CHECKPOINTS = "runtime.checkpoint_dir=gs://funmatch-test/checkpoints"
# backend/src/v2/driver/util.go: inputPipelineChannelPattern, what isInputParameterChannel matches
CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")
RESOURCE_FIELDS = ("resourceCpuLimit", "resourceCpuRequest", "resourceMemoryLimit", "resourceMemoryRequest")
VARIANTS = [(name, smoke) for smoke in (False, True) for name in config.preset_names()]
IDS = [f"{name}{'+smoke' if smoke else ''}" for name, smoke in VARIANTS]

# The IR this DAG compiled before (pipelines/funmatch_pipeline.py at 277850b, preset demo), cut to one task.
BROKEN: dict[str, Any] = {
    "spec": {
        "root": {
            "inputDefinitions": {
                "parameters": {
                    "accelerator_type": {"parameterType": "STRING", "defaultValue": "nvidia.com/gpu"},
                    "accelerator_count": {"parameterType": "NUMBER_INTEGER", "defaultValue": 1.0},
                }
            },
            "dag": {
                "tasks": {
                    "distill": {
                        "componentRef": {"name": "comp-distill"},
                        "inputs": {
                            "parameters": {
                                "num_accelerators": {"componentInputParameter": "accelerator_count"},
                                "pipelinechannel--accelerator_count": {"componentInputParameter": "accelerator_count"},
                                "pipelinechannel--accelerator_type": {"componentInputParameter": "accelerator_type"},
                            }
                        },
                        "retryPolicy": {
                            "backoffDuration": "60s",
                            "backoffFactor": 2.0,
                            "backoffMaxDuration": "3600s",
                            "maxRetryCount": 5,
                        },
                    }
                }
            },
        },
        "components": {
            "comp-distill": {
                "executorLabel": "exec-distill",
                "inputDefinitions": {"parameters": {"num_accelerators": {"parameterType": "NUMBER_INTEGER"}}},
            }
        },
        "deploymentSpec": {
            "executors": {
                "exec-distill": {
                    "container": {
                        "image": "ghcr.io/funmatch/funmatch-cuda:0.1.0",
                        "resources": {
                            "accelerator": {
                                "resourceCount": "{{$.inputs.parameters['pipelinechannel--accelerator_count']}}",
                                "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
                            },
                            "resourceCpuRequest": "8",
                            "resourceMemoryRequest": "48Gi",
                        },
                    }
                }
            }
        },
    },
    "k8s": {
        "exec-distill": {
            "activeDeadlineSeconds": "1209600",
            "nodeSelector": {"labels": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
            "tolerations": [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}],
        }
    },
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Any:
    """(preset, smoke) -> (config, IR), compiled for a cluster once per module."""
    cache: dict[tuple[str, bool], tuple[config.Config, dict[str, Any]]] = {}

    def get(name: str, smoke: bool) -> tuple[config.Config, dict[str, Any]]:
        if (name, smoke) not in cache:
            cfg = config.load(name, ["smoke=true"] if smoke else [])
            if cfg.resources.accelerator_count >= 1:
                config.apply_overrides(cfg, [CHECKPOINTS])
            path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
            compile_pipeline(cfg, str(path))
            spec, platform = (d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d)
            k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            cache[name, smoke] = cfg, {"spec": spec, "k8s": k8s}
        return cache[name, smoke]

    return get


def _kind(value: Any) -> str:
    return "STRING" if isinstance(value, str) else "BOOLEAN" if isinstance(value, bool) else "NUMBER"


def _container_tasks(ir: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(stage, task, its input parameters' values, their kinds) of every container task, traced from the root
    through every sub-DAG: the values a run starts with (the defaults), as the driver receives them."""
    spec = ir["spec"]
    components = spec["components"]

    def visit(dag: dict[str, Any], values: dict[str, Any], kinds: dict[str, str]) -> Iterator[Any]:
        for task in dag.get("dag", {}).get("tasks", {}).values():
            ref = task["componentRef"]["name"]
            task_values, task_kinds = {}, {}
            for name, source in task.get("inputs", {}).get("parameters", {}).items():
                if "componentInputParameter" in source:
                    task_values[name] = values.get(source["componentInputParameter"])
                    task_kinds[name] = kinds.get(source["componentInputParameter"], "?")
                elif "runtimeValue" in source:
                    task_values[name] = source["runtimeValue"]["constant"]
                    task_kinds[name] = _kind(task_values[name])
                else:  # another task's output: its declared type, no value before the run
                    out = source["taskOutputParameter"]
                    producer = components[dag["dag"]["tasks"][out["producerTask"]]["componentRef"]["name"]]
                    task_values[name] = None
                    task_kinds[name] = producer["outputDefinitions"]["parameters"][out["outputParameterKey"]][
                        "parameterType"
                    ]
            if "dag" in components[ref]:
                yield from visit(components[ref], task_values, task_kinds)
            else:
                stage = re.sub(r"-\d+$", "", ref.removeprefix("comp-"))
                yield stage, task, task_values, {k: v.split("_")[0] for k, v in task_kinds.items()}

    root = spec["root"]["inputDefinitions"]["parameters"]
    yield from visit(
        spec["root"],
        {n: p.get("defaultValue") for n, p in root.items()},
        {n: p["parameterType"] for n, p in root.items()},
    )


def _executor(ir: dict[str, Any], task: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    label = ir["spec"]["components"][task["componentRef"]["name"]]["executorLabel"]
    return label, ir["spec"]["deploymentSpec"]["executors"][label]["container"]


def resolve_pod_spec_input_runtime_parameter(text: str, values: dict[str, Any]) -> str:
    """backend/src/v2/driver/resolve.go resolvePodSpecInputRuntimeParameter: a channel resolves to
    `val.GetStringValue()` of the task's input (so "" for a NUMBER or BOOLEAN), anything else to itself."""
    match = CHANNEL.search(text)
    if not match:
        return text
    value = values.get(match[1])
    return value if isinstance(value, str) else ""


def gpu_limit(container: dict[str, Any], values: dict[str, Any]) -> tuple[str, int] | None:
    """backend/src/v2/driver/driver.go initPodSpecPatch: the accelerator's type (resourceType, else type) and
    count (resourceCount, else count when > 0) resolved; the limit is set only when both are non-empty."""
    acc = container.get("resources", {}).get("accelerator")
    if not acc:
        return None
    if acc.get("resourceType"):
        kind = resolve_pod_spec_input_runtime_parameter(acc["resourceType"], values)
    else:
        kind = acc.get("type", "")
    if acc.get("resourceCount"):
        count = resolve_pod_spec_input_runtime_parameter(acc["resourceCount"], values)
    else:
        count = str(acc["count"]) if int(acc.get("count", 0)) > 0 else ""
    return (kind, int(count)) if kind and count else None


# ---------------------------------------------------------------- the rules: each returns its violations


def non_string_resource_fields(ir: dict[str, Any]) -> list[str]:
    """A resource field (accelerator type/count, CPU, memory, image) fed by a pipeline channel must be a
    STRING parameter: driver.go reads every one through resolvePodSpecInputRuntimeParameter (resolve.go)."""
    bad = []
    for stage, task, _, kinds in _container_tasks(ir):
        label, container = _executor(ir, task)
        res = container.get("resources", {})
        fields = {f: res[f] for f in RESOURCE_FIELDS if f in res} | {"image": container["image"]}
        fields |= {f"accelerator.{f}": v for f, v in res.get("accelerator", {}).items() if isinstance(v, str)}
        for field, text in fields.items():
            for param in CHANNEL.findall(text):
                if kinds.get(param) != "STRING":
                    bad.append(f"{stage} ({label}): {field} is fed by {param}, a {kinds.get(param)} parameter")
    return bad


def unresolved_gpu_limits(ir: dict[str, Any], gpu_stages: set[str]) -> list[str]:
    """Each GPU stage's task gets a GPU limit >= 1 from the driver (driver.go initPodSpecPatch skips an
    accelerator whose resolved type or count is empty, without a word)."""
    bad = []
    for stage, task, values, _ in _container_tasks(ir):
        if stage in gpu_stages:
            limit = gpu_limit(_executor(ir, task)[1], values)
            if limit is None or limit[1] < 1:
                bad.append(f"{stage}: the driver resolves its GPU limit to {limit}")
    return bad


def short_retry_windows(ir: dict[str, Any]) -> list[str]:
    """A retried task's window covers (retries + 1) x its deadline plus the backoffs. KFP passes
    backoffMaxDuration as Argo's retryStrategy.backoff.maxDuration (backend/src/v2/compiler/argocompiler/
    container.go getTaskRetryParametersWithValues, getTaskRetryStrategyFromInput; left unset, the template's
    default "0" applies, i.e. no retry at all), and Argo measures it from the FIRST attempt's start
    (workflow/controller/operator.go processNodeRetries: "Max duration limit exceeded", "Backoff would exceed
    max duration limit"); the deadline is the pod's activeDeadlineSeconds (driver/k8s.go extendPodSpecPatch).
    Argo reads backoff.factor as an integer (util/intstr/parametrizable.go Int32)."""
    bad = []
    for stage, task, _, _ in _container_tasks(ir):
        policy = task.get("retryPolicy")
        if not policy:
            continue
        label, _ = _executor(ir, task)
        timeout = int(ir["k8s"].get(label, {}).get("activeDeadlineSeconds", 0))
        retries, factor = int(policy.get("maxRetryCount", 0)), float(policy.get("backoffFactor", 2.0))
        first = float(policy.get("backoffDuration", "0s").removesuffix("s"))
        window = float(policy.get("backoffMaxDuration", "0s").removesuffix("s"))
        needed = (retries + 1) * timeout + sum(first * factor**i for i in range(retries))
        if not timeout or window < needed or not factor.is_integer():
            bad.append(
                f"{stage}: retry window {window:.0f}s < {needed:.0f}s = ({retries} + 1) x {timeout}s deadline "
                f"+ backoffs (factor {factor})"
            )
    return bad


def gpu_requests(ir: dict[str, Any]) -> list[str]:
    """A CPU config asks for no accelerator and no GPU node (no node selector, no toleration)."""
    bad = []
    for stage, task, _, _ in _container_tasks(ir):
        label, container = _executor(ir, task)
        if container.get("resources", {}).get("accelerator"):
            bad.append(f"{stage}: requests an accelerator")
        bad += [f"{stage}: has a {key}" for key in ("nodeSelector", "tolerations") if key in ir["k8s"].get(label, {})]
    return bad


# ---------------------------------------------------------------- every preset


def _gpu_stages(cfg: config.Config) -> set[str]:
    return {"train-teacher", "distill"} | ({"evaluate"} if cfg.eval.on_gpu else set())


@pytest.mark.parametrize(("name", "smoke"), VARIANTS, ids=IDS)
def test_resource_fields_are_string_parameters_or_literals(compiled, name, smoke):
    assert non_string_resource_fields(compiled(name, smoke)[1]) == []


@pytest.mark.parametrize(("name", "smoke"), VARIANTS, ids=IDS)
def test_gpu_tasks_get_a_limit_the_driver_resolves_and_cpu_configs_none(compiled, name, smoke):
    cfg, ir = compiled(name, smoke)
    if cfg.resources.accelerator_count >= 1:
        assert unresolved_gpu_limits(ir, _gpu_stages(cfg)) == []
        limits = {gpu_limit(_executor(ir, t)[1], v) for s, t, v, _ in _container_tasks(ir) if s in _gpu_stages(cfg)}
        kind = cfg.resources.accelerator_type
        assert limits <= {(kind, cfg.resources.accelerator_count), (kind, 1)}  # evaluate: one GPU
    else:
        assert gpu_requests(ir) == []


@pytest.mark.parametrize(("name", "smoke"), VARIANTS, ids=IDS)
def test_retry_windows_cover_every_attempt(compiled, name, smoke):
    cfg, ir = compiled(name, smoke)
    retried = {stage for stage, task, _, _ in _container_tasks(ir) if task.get("retryPolicy")}
    assert retried == _gpu_stages(cfg) - ({"evaluate"} if not cfg.resources.accelerator_count else set())
    assert short_retry_windows(ir) == []


@pytest.mark.parametrize("name", config.preset_names())
def test_gpu_presets_checkpoint_to_gs_from_every_distill_task(compiled, name):
    """A cluster compile of a GPU preset carries its gs:// runtime.checkpoint_dir, as the checkpoint_root
    parameter's default, into every distill task: a retry resumes from there."""
    cfg, ir = compiled(name, False)
    if cfg.resources.accelerator_count >= 1:
        roots = [v["checkpoint_root"] for stage, _, v, _ in _container_tasks(ir) if stage == "distill"]
        assert roots == [cfg.runtime.checkpoint_dir] * 2 and roots[0].startswith("gs://")  # one per teacher branch


def test_cpu_configs_are_the_local_presets_and_every_smoke_variant(compiled):
    cpu = {(n, s) for n, s in VARIANTS if compiled(n, s)[0].resources.accelerator_count == 0}
    local = {("demo", False), ("demo-tiny", False), ("folder", False)}  # the presets made for 2 CPU cores
    assert cpu == local | {(n, True) for n in config.preset_names()}


# ---------------------------------------------------------------- each rule fails on the broken IR


def test_a_number_parameter_feeding_the_gpu_count_is_caught():
    assert non_string_resource_fields(BROKEN) == [
        "distill (exec-distill): accelerator.resourceCount is fed by pipelinechannel--accelerator_count, "
        "a NUMBER parameter"
    ]
    assert gpu_limit(BROKEN["spec"]["deploymentSpec"]["executors"]["exec-distill"]["container"], {}) is None
    assert unresolved_gpu_limits(BROKEN, {"distill"}) == ["distill: the driver resolves its GPU limit to None"]
    fixed = copy.deepcopy(BROKEN)
    fixed["spec"]["root"]["inputDefinitions"]["parameters"]["accelerator_count"] = {
        "parameterType": "STRING",
        "defaultValue": "1",
    }
    assert non_string_resource_fields(fixed) == [] and unresolved_gpu_limits(fixed, {"distill"}) == []


def test_a_one_hour_retry_window_on_a_two_week_deadline_is_caught():
    assert short_retry_windows(BROKEN) == [
        "distill: retry window 3600s < 7259460s = (5 + 1) x 1209600s deadline + backoffs (factor 2.0)"
    ]
    unset = copy.deepcopy(BROKEN)
    del unset["spec"]["root"]["dag"]["tasks"]["distill"]["retryPolicy"]["backoffMaxDuration"]
    assert short_retry_windows(unset)  # unset compiles to Argo maxDuration "0": no retry at all
    fixed = copy.deepcopy(BROKEN)
    fixed["spec"]["root"]["dag"]["tasks"]["distill"]["retryPolicy"]["backoffMaxDuration"] = "7259460s"
    assert short_retry_windows(fixed) == []


def test_gpu_requests_of_a_cpu_config_are_caught():
    assert gpu_requests(BROKEN) == [
        "distill: requests an accelerator",
        "distill: has a nodeSelector",
        "distill: has a tolerations",
    ]
