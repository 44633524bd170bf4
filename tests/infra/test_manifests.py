"""manifests/: what `kubectl apply -k` would create, checked without a cluster.

Every object of every overlay (rendered by kustomize.py) validates: built-in kinds against the
Kubernetes OpenAPI schemas (pip `kubernetes-validate`, strict), Kubeflow Trainer kinds against the
vendored v2.3.0 CRDs (jsonschema, defaults, CEL rules via pip `cel-python`, list-map keys) and through the
published `kubeflow-trainer-api` models; each validator is shown broken objects it must reject. Plus what
no schema sees: references between objects, RBAC evaluated like the API server's authorizer, the contract
with the pipeline (image, user, GPU selector/toleration), Workload Identity on every account a funmatch pod
or the KFP UI's artifact server runs as, and the smoke TrainJob's command run for real under torchrun on CPU.
"""

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
from collections.abc import Callable

import pytest
import yaml

from .dockerfile import final_user
from .k8s import allowed, builtin_errors, manifest_errors
from .kustomize import find, group_version, objects
from .paths import (
    CRD_DIR,
    DOCKERFILES,
    MANIFESTS,
    RENDER_DIRS,
    ROOT,
    TRAINER_GROUP,
    expected_image,
    project_version,
)

PROFILE = "overlays/gke-profile"  # multi-user Kubeflow: one profile namespace (needs overlays/gke for the cluster)
RENDERED = tuple(dict.fromkeys((*RENDER_DIRS, PROFILE)))  # every directory `kubectl apply -k` is told to take
WI_KEY = "iam.gke.io/gcp-service-account"
GSA = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]@[a-z][a-z0-9-]{4,28}[a-z0-9]\.iam\.gserviceaccount\.com")


def test_vendored_crds_are_the_published_v2_3_0_files():
    table = dict(re.findall(r"\|\s*(\S+\.yaml)\s*\|\s*([0-9a-f]{64})\s*\|", (CRD_DIR / "README.md").read_text()))
    assert set(table) == {"trainer.kubeflow.org_clustertrainingruntimes.yaml", "trainer.kubeflow.org_trainjobs.yaml"}
    for name, digest in table.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, f"{name} differs from v2.3.0"
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()


@pytest.mark.parametrize("which", RENDERED)
def test_every_rendered_manifest_validates(which):
    objs = objects(which)
    assert objs, which
    problems = {f"{o['kind']}/{o['metadata']['name']}": manifest_errors(o) for o in objs}
    assert not {k: v for k, v in problems.items() if v}, problems


def example_trainjob() -> dict:
    return yaml.safe_load((MANIFESTS / "examples" / "trainjob-smoke.yaml").read_text())


def test_example_trainjob_validates_and_names_the_runtime():
    tj = example_trainjob()
    assert manifest_errors(tj) == []
    ref = tj["spec"]["runtimeRef"]
    runtime = find(objects("base"), ref["kind"], ref["name"])
    assert ref["apiGroup"] == group_version(runtime["apiVersion"])[0]
    assert tj["metadata"]["namespace"] == find(objects("base"), "ServiceAccount")["metadata"]["namespace"]


def _ctr(objs: list[dict]) -> dict:
    return find(objs, "ClusterTrainingRuntime", "funmatch-distill")


def _pod(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _mutate(which: str, kind: str, fn: Callable[[dict], object], name: str | None = None) -> Callable[[], dict]:
    def make() -> dict:
        objs = objects(which) if which != "example" else [example_trainjob()]
        obj = find(objs, kind, name)
        fn(obj)
        return obj

    return make


BROKEN = {  # case: (make the broken object, a phrase the errors must contain)
    # Trainer v2.2 removed mlPolicy.torch.numProcPerNode: strict schema (and the typed API) must refuse it.
    "runtime: removed field numProcPerNode": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["spec"]["mlPolicy"]["torch"].update(numProcPerNode=8)),
        "numProcPerNode",
    ),
    "runtime: two ML policies (CEL)": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["spec"]["mlPolicy"].update(mpi={})),
        "Only one of the policy",
    ),
    "runtime: namespaced cluster object": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["metadata"].update(namespace="kubeflow")),
        "cluster-scoped",
    ),
    "runtime: duplicate container (list-map)": (
        _mutate(
            "base",
            "ClusterTrainingRuntime",
            lambda o: _pod(o)["containers"].append(copy.deepcopy(_pod(o)["containers"][0])),
        ),
        "list-map",
    ),
    "runtime: mount of a missing volume": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: _pod(o).update(volumes=[])),
        "undefined volume",
    ),
    "runtime: bad quantity": (
        _mutate(
            "base", "ClusterTrainingRuntime", lambda o: _pod(o)["volumes"][0]["emptyDir"].update(sizeLimit="16 GB")
        ),
        "sizeLimit",
    ),
    "trainjob: name the Trainer refuses (CEL)": (
        _mutate("example", "TrainJob", lambda o: o["metadata"].update(name="distill.v1")),
        "matches",
    ),
    "trainjob: numNodes as text": (
        _mutate("example", "TrainJob", lambda o: o["spec"]["trainer"].update(numNodes="two")),
        "numNodes",
    ),
    "trainjob: no runtimeRef": (_mutate("example", "TrainJob", lambda o: o["spec"].pop("runtimeRef")), "runtimeRef"),
    "trainjob: unknown managedBy (CEL)": (
        _mutate("example", "TrainJob", lambda o: o["spec"].update(managedBy="me")),
        "managedBy",
    ),
    "rolebinding: no roleRef": (_mutate("base", "RoleBinding", lambda o: o.pop("roleRef")), "roleRef"),
    "role: unknown field": (_mutate("base", "Role", lambda o: o["rules"][0].update(verb=["get"])), "verb"),
    "priorityclass: value as text": (_mutate("base", "PriorityClass", lambda o: o.update(value="high")), "high"),
    "serviceaccount: bad annotation key": (
        _mutate(
            "overlays/gke",
            "ServiceAccount",
            lambda o: o["metadata"]["annotations"].update({"iam.gke.io/gcp service account": "x"}),
            "pipeline-runner",
        ),
        "annotation key",
    ),
    "profile: clusterrolebinding name not DNS-1123": (
        _mutate(PROFILE, "ClusterRoleBinding", lambda o: o["metadata"].update(name="reader-Team-A")),
        "DNS-1123",
    ),
    "pvc: unknown access mode field": (
        _mutate(
            "overlays/gke-datasets", "PersistentVolumeClaim", lambda o: o["spec"].update(accessMode="ReadWriteMany")
        ),
        "accessMode",
    ),
    "unknown kind": (
        lambda: {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
        "no schema",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validators_reject_broken_manifests(case):
    make, expected = BROKEN[case]
    errs = manifest_errors(make())
    assert errs, f"{case}: accepted"
    assert any(expected in e for e in errs), errs


def test_kubernetes_validate_is_strict_about_unknown_fields():
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}}
    assert builtin_errors(sa) == []
    assert builtin_errors({**sa, "automountServiceAccountToken": "yes"})
    assert builtin_errors({**sa, "imagePullSecret": []})  # typo of imagePullSecrets


# --- what no schema sees ----------------------------------------------------------------------------


def applied(which: str) -> list[dict]:
    """What the cluster holds after `kubectl apply -k manifests/<which>`: a profile's objects come with the
    cluster-wide ones overlays/gke applies once (the ClusterRole, the runtime, the PriorityClass)."""
    objs = objects(which)
    if which == PROFILE:
        objs += [o for o in objects("overlays/gke") if "namespace" not in o["metadata"]]
    return objs


def pipeline_account(which: str) -> str:
    """The ServiceAccount KFP runs pipeline tasks as: pipeline-runner (standalone), default-editor (profiles)."""
    return "default-editor" if which == PROFILE else "pipeline-runner"


@pytest.mark.parametrize("which", RENDERED)
def test_rbac_lets_the_pipeline_account_launch_and_follow_trainjobs(which):
    objs = applied(which)
    sa = find(objs, "ServiceAccount", pipeline_account(which))
    me, ns = (sa["metadata"]["namespace"], sa["metadata"]["name"]), sa["metadata"]["namespace"]
    for verb in ("create", "get", "list", "watch", "delete"):
        assert allowed(objs, me, verb, TRAINER_GROUP, "trainjobs", ns), verb
    assert allowed(objs, me, "get", TRAINER_GROUP, "trainjobs/status", ns)
    for resource in ("pods", "pods/log", "events"):
        for verb in ("get", "list", "watch"):
            assert allowed(objs, me, verb, "", resource, ns), (verb, resource)
    assert allowed(objs, me, "get", TRAINER_GROUP, "clustertrainingruntimes", None)
    # least privilege: nothing beyond that
    assert not allowed(objs, me, "create", TRAINER_GROUP, "trainjobs", "default")
    assert not allowed(objs, (ns, "default"), "create", TRAINER_GROUP, "trainjobs", ns)
    assert not allowed(objs, me, "get", "", "secrets", ns)
    assert not allowed(objs, me, "create", "", "pods", ns)
    assert not allowed(objs, me, "delete", "", "pods", ns)
    assert not allowed(objs, me, "create", TRAINER_GROUP, "clustertrainingruntimes", None)


def test_rbac_check_is_live():
    objs = objects("base")
    me = ("kubeflow", "pipeline-runner")
    assert allowed(objs, me, "create", TRAINER_GROUP, "trainjobs", "kubeflow")
    find(objs, "RoleBinding")["subjects"][0]["name"] = "pipeline-runer"
    assert not allowed(objs, me, "create", TRAINER_GROUP, "trainjobs", "kubeflow")


def _ids(objs: list[dict]) -> set[tuple[str, str | None, str]]:
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}


@pytest.mark.parametrize("which", RENDERED)
def test_references_between_objects_resolve(which):
    objs = objects(which)
    ids = _ids(applied(which))  # a profile refers to the cluster-wide objects overlays/gke applies once
    for b in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref_ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], ref_ns, b["roleRef"]["name"]) in ids, b["metadata"]["name"]
        for s in b["subjects"]:
            assert ("ServiceAccount", s.get("namespace") or b["metadata"].get("namespace"), s["name"]) in ids, s
    if which == PROFILE:
        return
    pod = _pod(_ctr(objs))
    sa = find(objs, "ServiceAccount", pod["serviceAccountName"])  # TrainJob pods act as the pipeline's account
    assert ("PriorityClass", None, pod["priorityClassName"]) in ids
    for v in pod["volumes"]:
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", sa["metadata"]["namespace"], claim) in ids, claim


def test_runtime_keeps_the_pipelines_contract():
    """The runtime runs funmatch's CUDA image as its non-root user on the GPU pool the DAG targets."""
    from funmatch.config import ResourcesConfig

    res = ResourcesConfig()
    base, gke = _ctr(objects("base")), _ctr(objects("overlays/gke"))
    assert base["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in base["spec"]["mlPolicy"]
    pod = _pod(base)
    (node,) = pod["containers"]
    assert node["name"] == "node"  # the container Trainer's torch plugin configures
    assert node["image"] == expected_image("cuda")  # ghcr.io/funmatch/funmatch-cuda:<package version>
    gke_image = f"us-docker.pkg.dev/example-project/funmatch/funmatch-cuda:{project_version()}"
    assert _pod(gke)["containers"][0]["image"] == gke_image  # the overlay's `images:` entry, same tag
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in node["env"]
    assert {"key": res.toleration_key, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nodeSelector" not in pod  # cloud-neutral base ...
    assert _pod(gke)["nodeSelector"] == {res.node_selector_key: res.node_selector_value}  # ... GKE pool
    shm_mount = next(m["name"] for m in node["volumeMounts"] if m["mountPath"] == "/dev/shm")
    shm = {v["name"]: v for v in pod["volumes"]}[shm_mount]
    assert shm["emptyDir"]["medium"] == "Memory"
    uid = int(final_user(DOCKERFILES["cuda"]).split(":")[0])
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True


def test_gke_overlay_wires_gcs_without_keys():
    """Workload Identity on the pipeline account, GCS as KFP's default pipeline root in its namespace."""
    assert "annotations" not in find(objects("base"), "ServiceAccount")["metadata"]
    objs = objects("overlays/gke")
    sa = find(objs, "ServiceAccount", "pipeline-runner")
    launcher = find(objs, "ConfigMap", "kfp-launcher")
    assert launcher["metadata"]["namespace"] == sa["metadata"]["namespace"]
    assert re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9]/\S+", launcher["data"]["defaultPipelineRoot"])
    assert not [o for o in objs if o["kind"] == "Secret"]  # no key material
    email = sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    account_id, project = r"[a-z][a-z0-9-]{4,28}[a-z0-9]", r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
    assert re.fullmatch(rf"{account_id}@{project}\.iam\.gserviceaccount\.com", email), email


def workload_accounts(which: str, objs: list[dict]) -> dict[tuple[str, str], str]:
    """(namespace, name) -> who: every Kubernetes account that a funmatch pod or the KFP UI's artifact server
    runs as in this rendering. KFP standalone runs every pipeline task (CPU pool and GPU pool alike) as
    kubeflow/pipeline-runner and the UI server as kubeflow/ml-pipeline-ui; TrainJob pods run as the runtime's
    serviceAccountName in the TrainJob's namespace. Multi-user Kubeflow runs the tasks, their TrainJobs and the
    namespace's artifact viewer (ml-pipeline-ui-artifact) as the profile's default-editor."""
    ns = find(objs, "RoleBinding", "funmatch-trainjob-launcher")["metadata"]["namespace"]
    if which == PROFILE:
        return {(ns, "default-editor"): "pipeline tasks, their TrainJobs and the namespace's artifact viewer"}
    accounts: dict[tuple[str, str], str] = {}
    for account, who in (
        ((ns, pipeline_account(which)), "pipeline tasks on every node pool"),
        ((ns, _pod(_ctr(objs))["serviceAccountName"]), "TrainJob pods"),
        (("kubeflow", "ml-pipeline-ui"), "the KFP UI server reading artifacts from gs://"),
    ):
        accounts[account] = f"{accounts[account]}, {who}" if account in accounts else who
    return accounts


def workload_identity_gaps(objs: list[dict], accounts: dict[tuple[str, str], str]) -> list[str]:
    """Each account of `accounts` that is not rendered with a Workload Identity annotation naming a Google
    service account, and why."""
    gaps = []
    for (ns, name), who in sorted(accounts.items()):
        hits = [
            o
            for o in objs
            if o["kind"] == "ServiceAccount" and (o["metadata"].get("namespace"), o["metadata"]["name"]) == (ns, name)
        ]
        email = (hits[0]["metadata"].get("annotations") or {}).get(WI_KEY) if hits else None
        if not hits:
            gaps.append(f"{ns}/{name} ({who}): no ServiceAccount rendered")
        elif email is None:
            gaps.append(f"{ns}/{name} ({who}): no {WI_KEY} annotation")
        elif not GSA.fullmatch(email):
            gaps.append(f"{ns}/{name} ({who}): {email!r} is not a Google service account address")
    return gaps


@pytest.mark.parametrize("which", [d for d in RENDERED if d.startswith("overlays/gke")])
def test_every_account_a_stage_or_the_ui_runs_as_has_workload_identity(which):
    """On GKE a pod without it writes gs:// as the node's service account (read-only storage scope on default
    pools), and the KFP UI cannot read the HTML report: every such account is annotated, none is left out."""
    objs = objects(which)
    accounts = workload_accounts(which, objs)
    assert workload_identity_gaps(objs, accounts) == []
    rendered = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs if o["kind"] == "ServiceAccount"}
    assert rendered == set(accounts)  # and no other account is touched


def test_workload_identity_check_is_live():
    objs = objects("overlays/gke")
    accounts = workload_accounts("overlays/gke", objs)
    # the cloud-neutral base annotates nothing (and has no UI account)
    base = objects("base")
    assert workload_identity_gaps(base, workload_accounts("base", base)) == [
        "kubeflow/ml-pipeline-ui (the KFP UI server reading artifacts from gs://): no ServiceAccount rendered",
        f"kubeflow/pipeline-runner (pipeline tasks on every node pool, TrainJob pods): no {WI_KEY} annotation",
    ]
    # the UI's account without its annotation, or missing altogether
    unannotated = copy.deepcopy(objs)
    find(unannotated, "ServiceAccount", "ml-pipeline-ui")["metadata"].pop("annotations")
    assert workload_identity_gaps(unannotated, accounts) == [
        f"kubeflow/ml-pipeline-ui (the KFP UI server reading artifacts from gs://): no {WI_KEY} annotation"
    ]
    without_ui = [o for o in objs if o["metadata"]["name"] != "ml-pipeline-ui"]
    assert [g.split(":")[-1] for g in workload_identity_gaps(without_ui, accounts)] == [" no ServiceAccount rendered"]
    # TrainJob pods moved to an account nobody annotated
    moved = copy.deepcopy(objs)
    _pod(_ctr(moved))["serviceAccountName"] = "trainer"
    assert workload_identity_gaps(moved, workload_accounts("overlays/gke", moved)) == [
        "kubeflow/trainer (TrainJob pods): no ServiceAccount rendered"
    ]
    # a key file path or a bare name is no Google service account
    bad = copy.deepcopy(objs)
    find(bad, "ServiceAccount", "pipeline-runner")["metadata"]["annotations"][WI_KEY] = "funmatch-pipelines"
    assert "is not a Google service account address" in workload_identity_gaps(bad, accounts)[0]
    # the profile's account: default-editor, not pipeline-runner
    profile = objects(PROFILE)
    find(profile, "ServiceAccount")["metadata"]["name"] = "pipeline-runner"
    assert "no ServiceAccount rendered" in workload_identity_gaps(profile, workload_accounts(PROFILE, profile))[0]


def test_the_docs_bind_every_annotated_account():
    """docs/cluster.md grants roles/iam.workloadIdentityUser to each annotated account on its Google service
    account (PROFILE standing for a profile namespace), and names every Google service account used."""
    docs = (ROOT / "docs" / "cluster.md").read_text()
    commands = [line for line in docs.replace("\\\n", " ").splitlines() if line.startswith("gcloud ")]
    for which in ("overlays/gke", PROFILE):
        for sa in (o for o in objects(which) if o["kind"] == "ServiceAccount"):
            ns = "PROFILE" if which == PROFILE else sa["metadata"]["namespace"]
            member = f"svc.id.goog[{ns}/{sa['metadata']['name']}]"
            gsa = sa["metadata"]["annotations"][WI_KEY].split("@")[0] + "@PROJECT.iam.gserviceaccount.com"
            assert any(member in c and gsa in c and "roles/iam.workloadIdentityUser" in c for c in commands), member
    assert "--workload-metadata=GKE_METADATA" in docs  # the node pools' side, which no manifest can set


def test_the_profile_overlay_coexists_with_the_gke_overlay():
    """Applied next to overlays/gke: no object of one replaces an object of the other (the ClusterRoleBinding
    has a per-namespace name), and the profile's Role is the one the kubeflow namespace gets."""
    gke, profile = objects("overlays/gke"), objects(PROFILE)
    assert not _ids(gke) & _ids(profile)
    assert not [o for o in profile if o["kind"] == "ClusterTrainingRuntime"]  # cluster objects: overlays/gke
    assert find(profile, "Role")["rules"] == find(gke, "Role")["rules"]
    ns = find(profile, "Role")["metadata"]["namespace"]
    assert find(profile, "ClusterRoleBinding")["metadata"]["name"].endswith(f"-{ns}")


@pytest.mark.parametrize("which", [d for d in RENDERED if d not in RENDER_DIRS])
def test_renderer_matches_kubectl_kustomize_on_the_profile_overlay(which):
    """test_kustomize.py compares paths.RENDER_DIRS with kubectl; this covers the rest of RENDERED."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / which)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out.stdout) if d)
    assert sorted(json.dumps(d, sort_keys=True) for d in objects(which)) == theirs


def test_priority_class_for_long_distillation():
    pc = find(objects("base"), "PriorityClass", "funmatch-distill")
    assert 0 < pc["value"] <= 1_000_000_000  # above default pods, in the user range
    assert pc["globalDefault"] is False and pc["preemptionPolicy"] == "Never"
    assert _pod(_ctr(objects("base")))["priorityClassName"] == pc["metadata"]["name"]


def test_dataset_pvc_is_opt_in():
    for which in ("base", "overlays/gke"):
        objs = objects(which)
        assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"], which
        assert "datasets" not in {v["name"] for v in _pod(_ctr(objs))["volumes"]}, which
    objs = objects("overlays/gke-datasets")
    pvc = find(objs, "PersistentVolumeClaim", "funmatch-datasets")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "standard-rwx"
    pod = _pod(_ctr(objs))
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "datasets")
    assert mount == {"name": "datasets", "mountPath": "/data", "readOnly": True}


@pytest.mark.slow
def test_example_trainjob_command_runs_under_torchrun_on_cpu():
    """The smoke TrainJob's command as Trainer's torch plugin starts it (PET_* environment), one node of
    two processes on CPU: gloo instead of NCCL, otherwise the same code path."""
    cmd = example_trainjob()["spec"]["trainer"]["command"]
    assert cmd[0] == "torchrun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scripts = sysconfig.get_path("scripts")
    env = dict(
        os.environ,
        PATH=f"{scripts}{os.pathsep}{os.environ['PATH']}",
        PET_NNODES="1",
        PET_NPROC_PER_NODE="2",
        PET_NODE_RANK="0",
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: torchrun and its workers
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 90 s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert sorted(re.findall(r"rank (\d)/2 on cpu: all_reduce ok", stdout)) == ["0", "1"], stdout
