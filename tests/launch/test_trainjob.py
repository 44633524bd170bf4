"""Multi-node distillation through a Kubeflow Trainer v2 TrainJob (funmatch/trainjob.py).

The TrainJob body is checked against the Trainer v2.3.0 CRD schema (vendored under manifests/schemas/).
The launcher runs against a stub of the Kubernetes API on 127.0.0.1 (ThreadingHTTPServer serving the
trainjobs custom-object endpoints, watch included) whose scripted "controller" moves the job through
its states; in the end-to-end case it runs the worker command from the POSTed TrainJob in-process,
so the command line, the staging of the inputs and the copy of the student are all exercised.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse
from uuid import uuid4

import jsonschema
import pytest
import yaml
from kfp import dsl

from components import image
from funmatch import config, storage
from funmatch.app import cli
from funmatch.errors import ConfigError
from funmatch.launch import tasks, trainjob
from infra.kustomize import find, objects
from infra.paths import RENDER_DIRS

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "manifests/schemas/kubeflow-trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml"
PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
NS = "ml"


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune (the schema does not declare them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(doc, dict) and "properties" in schema:
        for k, v in doc.items():
            if k not in schema["properties"]:
                out.append(f"{path}.{k}")
            else:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in doc.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(doc, list) and "items" in schema:
        for i, v in enumerate(doc):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def check_trainjob(body: dict, schema: dict) -> None:
    jsonschema.Draft7Validator(schema).validate(body)
    assert unknown_fields(body, schema) == []


def multi_node_cfg(**overrides) -> config.Config:
    return config.load(
        "demo-tiny",
        {
            "distill.num_nodes": 2,
            "resources.accelerator_count": 8,
            "resources.node_selector_value": "nvidia-h200-141gb",
            "resources.shm_size": "32Gi",
            "resources.timeout_hours": 2.5,
            **overrides,
        },
    )


def body_for(cfg: config.Config, **kwargs) -> dict:
    args = trainjob.worker_args(cfg.to_json(), "gs://b/ds", "gs://b/teacher", "gs://b/out", "gs://b/ckpt")
    return trainjob.manifest(
        cfg, **{"name": "funmatch-distill-abc", "namespace": NS, "image": "reg/img:1", "args": args, **kwargs}
    )


# ---------------------------------------------------------------- the TrainJob body


def test_trainjob_validates_and_carries_the_task_resources(schema):
    cfg = multi_node_cfg()
    body = body_for(cfg, owner={"name": "launcher-pod", "uid": "1234"}, service_account="pipeline-runner")
    check_trainjob(body, schema)

    spec = body["spec"]
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert spec["runtimeRef"] == {
        "name": "funmatch-distill",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    t = spec["trainer"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "8", "memory": "48Gi"}}
    assert t["image"] == "reg/img:1"
    assert t["command"] == ["torchrun", "--module", "funmatch"]
    assert t["args"][:2] == ["stage", "distill"]
    assert json.loads(t["args"][t["args"].index("--config-json") + 1]) == cfg.to_dict()
    assert t["args"][t["args"].index("--checkpoint-dir") + 1] == "gs://b/ckpt"
    assert not {e["name"] for e in t["env"]} & {
        "PET_NNODES",
        "PET_NPROC_PER_NODE",
        "PET_NODE_RANK",
        "PET_MASTER_ADDR",
        "PET_MASTER_PORT",
    }  # Trainer's, reserved
    assert spec["activeDeadlineSeconds"] == 9000

    (patch,) = spec["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == "node"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {"/dev/shm": "dshm", "/scratch": "scratch"}
    assert t["args"][t["args"].index("--cache-dir") + 1].startswith("/scratch/")
    assert pod["serviceAccountName"] == "pipeline-runner"
    assert body["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "launcher-pod",
            "uid": "1234",
            "blockOwnerDeletion": False,
            "controller": False,
        }
    ]
    assert body["metadata"]["labels"]["funmatch.dev/config-hash"] == cfg.hash()


def test_cpu_only_nodes_and_the_validator_is_live(schema):
    body = body_for(multi_node_cfg(**{"resources.accelerator_count": 0, "distill.num_nodes": 3}))
    check_trainjob(body, schema)
    assert body["spec"]["trainer"]["numNodes"] == 3 and body["spec"]["trainer"]["numProcPerNode"] == 1
    assert "limits" not in body["spec"]["trainer"]["resourcesPerNode"]

    wrong_type = json.loads(json.dumps(body))
    wrong_type["spec"]["trainer"]["numNodes"] = "3"
    with pytest.raises(jsonschema.ValidationError):
        check_trainjob(wrong_type, schema)
    misspelt = json.loads(json.dumps(body))
    misspelt["spec"]["trainer"]["resourcePerNode"] = misspelt["spec"]["trainer"].pop("resourcesPerNode")
    assert unknown_fields(misspelt, schema) == [".spec.trainer.resourcePerNode"]


def test_the_default_runtime_is_the_one_the_manifests_install():
    """trainjob.RUNTIME names the ClusterTrainingRuntime that `kubectl apply -k` creates (the one of every
    overlay that has one), with the priority class and restart policy; not the upstream torch-distributed."""
    assert find(objects("base"), "ClusterTrainingRuntime")["metadata"]["name"] == trainjob.RUNTIME
    for which in RENDER_DIRS:
        objs = objects(which)
        for runtime in [o for o in objs if o["kind"] == "ClusterTrainingRuntime"]:
            assert runtime["metadata"]["name"] == trainjob.RUNTIME, which
            pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
            assert find(objs, "PriorityClass", pod["priorityClassName"])
            assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] > 0
    ref = body_for(multi_node_cfg())["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("ClusterTrainingRuntime", trainjob.RUNTIME)


def test_patch_targets_the_runtimes_trainer_container():
    """runtimePatches name a replicated job and container; the runtime must have them (torch-distributed
    and the project's funmatch-distill both call them 'node', ancestor step 'trainer')."""
    runtime = find(objects("base"), "ClusterTrainingRuntime", trainjob.RUNTIME)
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    job = jobs[trainjob.NODE]
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert trainjob.NODE in [c["name"] for c in job["template"]["spec"]["template"]["spec"]["containers"]]


def test_job_name_is_stable_rfc1035_and_per_output():
    a, b = trainjob.job_name("gs://root/run-1/distill/student"), trainjob.job_name("gs://root/run-2/distill/student")
    assert a == trainjob.job_name("gs://root/run-1/distill/student") and a != b
    import re

    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 63


def test_num_nodes_is_validated():
    assert config.load("demo-tiny").distill.num_nodes == 1
    with pytest.raises(ConfigError, match="distill.num_nodes"):
        config.load("demo-tiny", ["distill.num_nodes=0"])


def test_service_account_from_the_pods_token(tmp_path, monkeypatch):
    monkeypatch.delenv("FUNMATCH_TRAINJOB_SERVICE_ACCOUNT", raising=False)
    claims = {"kubernetes.io": {"namespace": NS, "serviceaccount": {"name": "pipeline-runner", "uid": "u"}}}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    (tmp_path / "token").write_text(f"eyJhbGciOiJSUzI1NiJ9.{payload}.sig")
    assert trainjob.own_service_account(tmp_path / "token") == "pipeline-runner"
    assert trainjob.own_service_account(tmp_path / "missing") == ""
    monkeypatch.setenv("FUNMATCH_TRAINJOB_SERVICE_ACCOUNT", "other")
    assert trainjob.own_service_account(tmp_path / "token") == "other"


# ---------------------------------------------------------------- tasks.distill's branch


def _artifact(cls, path, uri=None):
    return cls(name=Path(path).name, uri=uri or str(path), metadata={})


def test_tasks_distill_needs_a_gcs_checkpoint_root(tmp_path):
    cfg = multi_node_cfg()
    student = _artifact(dsl.Model, tmp_path / "student")
    with pytest.raises(ConfigError, match="gs://"):
        tasks.distill(
            cfg.to_json(),
            _artifact(dsl.Dataset, tmp_path / "ds"),
            _artifact(dsl.Model, tmp_path / "t"),
            str(tmp_path / "ckpt"),
            "nvidia.com/gpu",
            8,
            image("cuda"),
            student,
        )
    assert not (tmp_path / "student").exists()


def test_tasks_distill_launches_a_trainjob(tmp_path, monkeypatch):
    seen: dict[str, Any] = {}

    def fake_run(cfg, **kwargs):
        seen.update(kwargs, cfg=cfg)
        return {"arch": "bit-r14-mini", "resolution": 32, "setup": "funmatch", "steps": 7, "wall_s": 1.5}

    monkeypatch.setattr(trainjob, "run", fake_run)
    monkeypatch.delenv("FUNMATCH_TRAINJOB_RUNTIME", raising=False)
    cfg = multi_node_cfg()
    dataset = _artifact(dsl.Dataset, tmp_path / "ds", uri="gs://pipelines/run-1/prep/dataset")
    teacher = _artifact(dsl.Model, tmp_path / "teacher", uri="s3://minio/run-1/teacher")
    student = _artifact(dsl.Model, tmp_path / "student", uri="gs://pipelines/run-1/distill/student")
    tasks.distill(cfg.to_json(), dataset, teacher, "gs://ckpt/root/", "nvidia.com/gpu", 4, "reg.io/x/cuda:7", student)
    used = seen["cfg"]
    assert used.resources.accelerator_count == 4 and used.distill.num_nodes == 2  # the task's accelerators
    assert seen["image"] == "reg.io/x/cuda:7"  # the image the pipeline gave the distill task
    assert seen["checkpoint_dir"] == f"gs://ckpt/root/{used.hash()}/distill"  # as on one node
    assert seen["shared_root"] == f"gs://ckpt/root/{used.hash()}/trainjob"
    assert seen["dataset"] == "gs://pipelines/run-1/prep/dataset"  # read in place by the pods
    assert seen["teacher"] == teacher.path  # not on GCS: staged by the launcher
    assert seen["out_dir"] == student.path and seen["key"] == student.uri
    assert seen["runtime"] == "funmatch-distill"
    assert student.metadata == {
        "arch": "bit-r14-mini",
        "resolution": 32,
        "setup": "funmatch",
        "steps": 7,
        "wall_s": 1.5,
    }


# ---------------------------------------------------------------- the launcher against a stub API server


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()}


def jobs(active=0, ready=0, succeeded=0, failed=0) -> list[dict]:
    return [
        {"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed, "suspended": 0}
    ]


class StubKube:
    """The trainjobs endpoints of a Kubernetes API server, in memory, plus a scripted controller."""

    def __init__(self, schema: dict, controller=None) -> None:
        self.schema, self.controller = schema, controller
        self.jobs: dict[str, dict] = {}
        self.events: list[tuple[int, str, str, dict]] = []  # (resourceVersion, type, name, object)
        self.requests: list[tuple[str, str, dict, dict | None]] = []  # (method, path, query, body)
        self.rv = 100
        self.cond = threading.Condition()
        self.fail_create: tuple[int, str] | None = None
        self.fail_gets = 0  # answer the next N reads of a TrainJob with 503
        self.threads: list[threading.Thread] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams as the API server sends

            def log_message(self, *args):
                pass

            def do_GET(self):
                stub.handle(self, "GET")

            def do_POST(self):
                stub.handle(self, "POST")

            def do_DELETE(self):
                stub.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        for t in self.threads:
            t.join(timeout=30)

    closed = False

    # -- state
    def put(self, name: str, kind: str, obj: dict | None) -> None:
        with self.cond:
            self.rv += 1
            if obj is None:
                gone = self.jobs.pop(name)
                gone["metadata"]["resourceVersion"] = str(self.rv)
                self.events.append((self.rv, "DELETED", name, gone))
            else:
                obj["metadata"]["resourceVersion"] = str(self.rv)
                self.jobs[name] = obj
                self.events.append((self.rv, kind, name, json.loads(json.dumps(obj))))
            self.cond.notify_all()

    def set_status(self, name: str, **status) -> None:
        """What the Trainer controller would write (checked against the CRD's status schema)."""
        jsonschema.Draft7Validator(self.schema["properties"]["status"]).validate(status)
        with self.cond:
            if name not in self.jobs:
                return
            obj = json.loads(json.dumps(self.jobs[name]))
        obj["status"] = status
        self.put(name, "MODIFIED", obj)

    def wait_for_watch(self, timeout_s: float = 20.0) -> None:
        """Until the launcher has opened a watch (later changes then reach it through the stream)."""
        end = time.monotonic() + timeout_s
        while not self.seen("GET", "trainjobs", watch="True"):
            assert time.monotonic() < end, "the launcher never watched"
            time.sleep(0.02)

    def seen(self, method: str, suffix: str = "", **query) -> list:
        return [
            r
            for r in self.requests
            if r[0] == method and r[1].endswith(suffix) and all(r[2].get(k) == [v] for k, v in query.items())
        ]

    # -- HTTP
    def reply(self, h, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def status(self, h, code: int, reason: str, message: str) -> None:
        self.reply(
            h,
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def handle(self, h, method: str) -> None:
        url = urlparse(h.path)
        query = parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        self.requests.append((method, url.path, query, body))
        assert url.path.startswith(PREFIX + NS + "/trainjobs"), url.path
        name = url.path[len(PREFIX + NS + "/trainjobs") :].strip("/")
        if method == "POST":
            assert body is not None, "a POST without a TrainJob"
            return self.create(h, body)
        if method == "DELETE":
            if name not in self.jobs:
                return self.status(h, 404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            self.put(name, "DELETED", None)
            return self.status(h, 200, "", "")  # a Status with code 200 is what DELETE answers
        if name:
            if self.fail_gets:
                self.fail_gets -= 1
                return self.status(h, 503, "ServiceUnavailable", "etcdserver: leader changed")
            if name not in self.jobs:
                return self.status(h, 404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            return self.reply(h, 200, self.jobs[name])
        if query.get("watch", [""])[0].lower() in ("true", "1"):
            return self.watch(h, query)
        return self.reply(h, 200, {"kind": "TrainJobList", "items": list(self.jobs.values())})

    def create(self, h, body: dict) -> None:
        if self.fail_create:
            code, message = self.fail_create
            return self.status(h, code, "Refused", message)
        name = body["metadata"]["name"]
        if name in self.jobs:
            return self.status(h, 409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
        obj = json.loads(json.dumps(body))
        obj["metadata"] |= {"namespace": NS, "uid": f"uid-{self.rv}", "creationTimestamp": _now(), "generation": 1}
        self.put(name, "ADDED", obj)
        self.reply(h, 201, self.jobs[name])
        if self.controller:
            t = threading.Thread(target=self.controller, args=(self, obj), daemon=True)
            self.threads.append(t)
            t.start()

    def watch(self, h, query: dict) -> None:
        (selector,) = query["fieldSelector"]
        assert selector.startswith("metadata.name=")
        name = selector.split("=", 1)[1]
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        end = time.monotonic() + float(query.get("timeoutSeconds", ["30"])[0])
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        try:
            while time.monotonic() < end and not self.closed:
                with self.cond:
                    new = [e for e in self.events if e[0] > since and e[2] == name]
                    if not new:
                        self.cond.wait(timeout=max(0.0, min(0.5, end - time.monotonic())))
                        continue
                for rv, kind, _, obj in new:
                    chunk((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                    since = rv
            chunk(b"")  # the watch ends (timeoutSeconds)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (cancel)
            h.close_connection = True


@pytest.fixture
def kube(schema):
    stubs = []

    def make(controller=None) -> StubKube:
        stubs.append(StubKube(schema, controller))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def api_client(stub: StubKube):
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=stub.host))


def launch(stub, cfg, tmp_path, dataset, teacher, root=None, **kwargs):
    root = root or str(tmp_path / "bucket")
    return trainjob.run(
        cfg,
        dataset=str(dataset),
        teacher=str(teacher),
        out_dir=tmp_path / "student",
        shared_root=root,
        checkpoint_dir=storage.join(root, "ckpt"),
        image="reg/funmatch-cuda:1",
        key="run-1/distill/student",
        namespace=NS,
        api_client=api_client(stub),
        watch_timeout_s=5,
        retry_s=0.1,
        timeout_s=60,
        **kwargs,
    )


@pytest.fixture(scope="module")
def gcs_emulator():
    from gcs_server import fake_gcs  # fake-gcs-server on 127.0.0.1 (tests/gcs_server.py)

    with fake_gcs() as url:
        yield url


def shared_root(where: str, request, tmp_path, monkeypatch) -> str:
    """Where the launcher and the pods meet: a directory, or a bucket of the GCS emulator (as in a cluster)."""
    if where == "local":
        return str(tmp_path / "bucket")
    url = request.getfixturevalue("gcs_emulator")
    for key, value in {
        "STORAGE_EMULATOR_HOST": url,
        "FUNMATCH_GCS_DEADLINE_S": "15",
        "FUNMATCH_GCS_TIMEOUT_S": "5",
        "FUNMATCH_GCS_BACKOFF_S": "0.05",
        "FUNMATCH_GCS_MAX_BACKOFF_S": "0.2",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"fm-{uuid4().hex[:12]}"
    storage.gcs_client().create_bucket(bucket)
    return f"gs://{bucket}/checkpoints/{uuid4().hex[:8]}/trainjob"


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_launcher_end_to_end(where, request, kube, schema, tmp_path, dataset_dir, teacher_dir, monkeypatch, caplog):
    """Created → Running → Complete, the worker command from the POSTed TrainJob run in-process."""
    monkeypatch.setenv("KFP_POD_NAME", "funmatch-xyz-distill-launcher")
    monkeypatch.setenv("KFP_POD_UID", "0f0f0f0f-1111-2222-3333-444455556666")
    monkeypatch.setenv("FUNMATCH_TRAINJOB_SERVICE_ACCOUNT", "pipeline-runner")
    root = shared_root(where, request, tmp_path, monkeypatch)
    scratch = tmp_path / "node-scratch"  # what the pod mounts at /scratch
    worker = {}

    def controller(stub, obj):
        name, t = obj["metadata"]["name"], obj["spec"]["trainer"]
        stub.set_status(name, jobsStatus=jobs())
        stub.wait_for_watch()  # the launcher has seen the job Created
        stub.set_status(name, jobsStatus=jobs(active=2, ready=2))
        assert t["command"] == trainjob.TORCHRUN  # torchrun --module funmatch <args>: run <args> here
        args = list(t["args"])
        args[args.index("--cache-dir") + 1] = str(scratch / "funmatch")
        worker["rc"] = cli.main(args)
        if worker["rc"] == 0:
            stub.set_status(
                name,
                jobsStatus=jobs(succeeded=2),
                conditions=[condition("Complete", "JobSetCompleted", "jobset completed")],
            )
        else:
            stub.set_status(name, conditions=[condition("Failed", "JobSetFailed", "worker failed")])

    stub = kube(controller)
    cfg = multi_node_cfg(
        **{
            "distill.epochs": 0.05,
            "distill.warmup_steps": 2,
            "distill.eval_every": 0,
            "resources.accelerator_count": 0,
            "runtime.device": "cpu",
        }
    )
    caplog.set_level(logging.INFO, logger="funmatch")
    info = launch(stub, cfg, tmp_path, dataset_dir, teacher_dir, root=root)

    assert worker["rc"] == 0
    (post,) = stub.seen("POST")
    body = post[3]
    check_trainjob(body, schema)
    name = trainjob.job_name("run-1/distill/student")
    assert body["metadata"]["name"] == name and body["metadata"]["namespace"] == NS
    assert body["metadata"]["ownerReferences"][0]["name"] == "funmatch-xyz-distill-launcher"
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["serviceAccountName"] == "pipeline-runner"
    args = body["spec"]["trainer"]["args"]
    staged = storage.join(root, name)
    assert args[args.index("--dataset") + 1] == storage.join(staged, "dataset")  # local artifacts are staged
    assert args[args.index("--teacher") + 1] == storage.join(staged, "teacher")
    assert args[args.index("--output") + 1] == storage.join(staged, "student")
    assert args[args.index("--checkpoint-dir") + 1] == storage.join(root, "ckpt")
    for part in ("dataset", "teacher") + (("student",) if where == "gcs" else ()):
        assert trainjob.complete(storage.join(staged, part))
    assert any("ckpt-" in f for f in storage.list_files(storage.join(root, "ckpt")))  # checkpoints there too
    env = {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}
    if where == "gcs":  # the pods fetched the inputs to their scratch disk and use the same GCS endpoint
        assert env["STORAGE_EMULATOR_HOST"] == os.environ["STORAGE_EMULATOR_HOST"]
        (fetched,) = (scratch / "funmatch").glob("dataset-*")
        assert trainjob.complete(str(fetched))
        (teacher_copy,) = (scratch / "funmatch").glob("teacher-*")
        assert (teacher_copy / "model.json").is_file()

    out = tmp_path / "student"
    assert json.loads((out / "model.json").read_text())["arch"] == cfg.student.arch
    assert (out / "member-0.safetensors").stat().st_size > 0
    assert not (out / trainjob.MARKER).exists()
    assert info == json.loads((out / "model.json").read_text()) and info["steps"] > 0
    assert stub.seen("GET", name) and stub.seen("GET", "trainjobs", watch="True")
    assert not stub.seen("DELETE")  # a finished job stays (its logs)

    text = caplog.text
    assert "Created" in text and "Running (node: 2 active, 2 ready" in text
    assert "condition Complete=True (JobSetCompleted): jobset completed" in text
    assert text.index("Created") < text.index("Running") < text.index("Complete=True")


def test_failed_trainjob_raises_a_clear_error(kube, tmp_path):
    def controller(stub, obj):
        name = obj["metadata"]["name"]
        stub.set_status(name, jobsStatus=jobs(active=2, ready=2))
        time.sleep(0.3)
        stub.set_status(
            name,
            jobsStatus=jobs(failed=1, active=1),
            conditions=[condition("Failed", "JobSetFailed", "jobset failed: node-1 exited with 137 (OOMKilled)")],
        )

    stub = kube(controller)
    src = fake_artifact(tmp_path)
    with pytest.raises(trainjob.TrainJobFailed) as e:
        launch(stub, multi_node_cfg(), tmp_path, src, src)
    msg = str(e.value)
    name = trainjob.job_name("run-1/distill/student")
    assert f"TrainJob {NS}/{name} failed: JobSetFailed: jobset failed: node-1 exited with 137 (OOMKilled)" in msg
    assert f"kubectl logs -n {NS} -l jobset.sigs.k8s.io/jobset-name={name}" in msg
    assert not stub.seen("DELETE") and name in stub.jobs  # kept for inspection
    assert not (tmp_path / "student").exists()


def test_sigterm_deletes_the_trainjob(kube, tmp_path):
    running = threading.Event()

    def controller(stub, obj):
        stub.set_status(obj["metadata"]["name"], jobsStatus=jobs(active=2, ready=2))
        running.set()  # and it runs for ever

    stub = kube(controller)
    src = fake_artifact(tmp_path)

    def cancel():  # SIGTERM once the launcher watches the running job, as kubelet sends it on a cancel
        running.wait(20)
        stub.wait_for_watch()
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):
        raise AssertionError("the launcher did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, unhandled)
    killer = threading.Thread(target=cancel, daemon=True)
    try:
        killer.start()
        with pytest.raises(SystemExit) as e:
            launch(stub, multi_node_cfg(), tmp_path, src, src)
    finally:
        killer.join(30)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the launcher put the old handler back
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == trainjob.PREEMPTED_EXIT
    name = trainjob.job_name("run-1/distill/student")
    (delete,) = stub.seen("DELETE")
    assert delete[1] == f"{PREFIX}{NS}/trainjobs/{name}"
    assert delete[3]["propagationPolicy"] == "Foreground"  # JobSet and pods go with it
    assert name not in stub.jobs


def fake_artifact(tmp_path) -> Path:
    """An input artifact for the cases whose TrainJob never reads it."""
    src = tmp_path / "ds"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    return src


def _existing(stub, cfg, tmp_path, src, status: dict, **changes) -> str:
    """The TrainJob an earlier attempt of the launcher left behind."""
    name = trainjob.job_name("run-1/distill/student")
    staged = tmp_path / "bucket" / name
    body = trainjob.manifest(
        cfg,
        name=name,
        namespace=NS,
        image="reg/funmatch-cuda:1",
        env={k: os.environ[k] for k in trainjob.FORWARDED_ENV if os.environ.get(k)},
        args=trainjob.worker_args(
            cfg.to_json(),
            str(staged / "dataset"),
            str(staged / "teacher"),
            str(staged / "student"),
            str(tmp_path / "bucket" / "ckpt"),
        ),
    )
    body["spec"]["trainer"] |= changes
    body["metadata"] |= {"namespace": NS, "uid": "old"}
    body["status"] = status
    stub.put(name, "ADDED", body)
    return name


def _publish_student(staged: Path) -> None:
    (staged / "student").mkdir(parents=True)
    (staged / "student" / "model.json").write_text(json.dumps({"arch": "bit-r14-mini", "steps": 3}))


def test_retry_replaces_a_failed_trainjob(kube, tmp_path):
    def controller(stub, obj):
        _publish_student(tmp_path / "bucket" / obj["metadata"]["name"])
        stub.set_status(obj["metadata"]["name"], conditions=[condition("Complete", "JobSetCompleted", "done")])

    stub = kube(controller)
    src = fake_artifact(tmp_path)
    cfg = multi_node_cfg()
    name = _existing(stub, cfg, tmp_path, src, {"conditions": [condition("Failed", "JobSetFailed", "preempted")]})
    info = launch(stub, cfg, tmp_path, src, src)
    assert info == {"arch": "bit-r14-mini", "steps": 3}
    methods = [r[0] for r in stub.requests if r[0] != "GET"]
    assert methods == ["POST", "DELETE", "POST"]  # 409, delete the failed one, create anew
    assert stub.jobs[name]["metadata"]["uid"] != "old"


def test_retry_adopts_a_running_identical_trainjob(kube, tmp_path):
    stub = kube()
    src = fake_artifact(tmp_path)
    cfg = multi_node_cfg()
    name = _existing(stub, cfg, tmp_path, src, {"jobsStatus": jobs(active=2, ready=2)})

    def finish():
        time.sleep(0.5)
        _publish_student(tmp_path / "bucket" / name)
        stub.set_status(name, conditions=[condition("Complete", "JobSetCompleted", "done")])

    threading.Thread(target=finish, daemon=True).start()
    assert launch(stub, cfg, tmp_path, src, src)["steps"] == 3
    assert [r[0] for r in stub.requests if r[0] != "GET"] == ["POST"]  # the 409; no delete, no second create
    assert stub.jobs[name]["metadata"]["uid"] == "old"


@pytest.mark.parametrize(
    "code, expected",
    [
        (404, "is Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1) installed"),
        (403, "needs create/get/list/watch/delete on trainjobs.trainer.kubeflow.org in namespace ml"),
    ],
)
def test_create_refused_says_why(kube, tmp_path, code, expected):
    stub = kube()
    stub.fail_create = (code, "the server could not find the requested resource" if code == 404 else "forbidden")
    src = fake_artifact(tmp_path)
    with pytest.raises(trainjob.TrainJobError, match=f"HTTP {code}") as e:
        launch(stub, multi_node_cfg(), tmp_path, src, src)
    assert expected in str(e.value)
    assert not stub.seen("GET")


def test_complete_without_a_student_is_an_error(kube, tmp_path):
    def controller(stub, obj):  # the pods "succeeded" but rank 0 never published
        stub.set_status(obj["metadata"]["name"], conditions=[condition("Complete", "JobSetCompleted", "done")])

    stub = kube(controller)
    src = fake_artifact(tmp_path)
    with pytest.raises(trainjob.TrainJobError, match="completed but its student at .* is incomplete"):
        launch(stub, multi_node_cfg(), tmp_path, src, src)
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("outage", ["short", "too long"])
def test_api_server_outage(kube, tmp_path, caplog, outage):
    """503s on reads are waited out; an outage longer than outage_s ends the launcher, which then
    deletes its TrainJob (nobody would copy its student)."""

    def controller(stub, obj):
        name = obj["metadata"]["name"]
        _publish_student(tmp_path / "bucket" / name)
        stub.set_status(name, conditions=[condition("Complete", "JobSetCompleted", "done")])

    stub = kube(controller)
    stub.fail_gets = 3 if outage == "short" else 10**6  # every read after the create, until healed
    caplog.set_level(logging.INFO, logger="funmatch")
    src = fake_artifact(tmp_path)
    if outage == "short":
        assert launch(stub, multi_node_cfg(), tmp_path, src, src, outage_s=5.0)["steps"] == 3
        assert caplog.text.count("HTTP 503 Service Unavailable; retrying") == 3 and not stub.seen("DELETE")
    else:
        with pytest.raises(trainjob.TrainJobError, match="cannot read TrainJob .* for 1s: HTTP 503"):
            launch(stub, multi_node_cfg(), tmp_path, src, src, outage_s=1.0)
        assert len(stub.seen("DELETE")) == 1
