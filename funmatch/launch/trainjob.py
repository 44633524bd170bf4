"""Distillation on several nodes: the distill task launches a Kubeflow Trainer v2 `TrainJob`.

With `distill.num_nodes > 1` the distill task does not train itself. It creates a `TrainJob`
(`trainer.kubeflow.org/v1alpha1`, Trainer v2.3) whose `runtimeRef` is the project's `funmatch-distill`
ClusterTrainingRuntime (manifests/base/cluster/trainingruntime.yaml: upstream `torch-distributed` plus
the CUDA image, the priority class and the restart policy), waits for it, logs its conditions, and
copies the student it wrote into the task's output artifact. Each of the TrainJob's `num_nodes` pods
runs, in the CUDA image,

    torchrun --module funmatch stage distill --config-json JSON --dataset URI --teacher URI
             --output URI --checkpoint-dir URI --cache-dir /scratch/funmatch

torchrun takes nodes, processes per node (the task's accelerator count), node rank and master
address from the `PET_*` variables that the Trainer's torch plugin sets; `run_worker` (below) fetches
the inputs to the node, calls `funmatch.stages.distill.run`, and rank 0 publishes the student.

Data flow: everything the pods read or write goes through gs:// under the checkpoint root, which must
be a gs:// URI for `num_nodes > 1` (the pods share no file system with the launcher):
- dataset / teacher: their artifact URIs when they are gs:// already (a GCS pipeline root), else the
  launcher uploads them once to `<root>/<config hash>/trainjob/<job>/{dataset,teacher}`;
- checkpoints: `<root>/<config hash>/distill`, as on one node, so a retry resumes;
- student: rank 0 uploads it to `<root>/<config hash>/trainjob/<job>/student`, then the launcher
  copies it into the KFP output artifact.
A copied tree is complete once its `_FUNMATCH_COMPLETE` marker exists (written last). With local
paths (one node: `tasks.torchrun_distill`; tests) nothing is copied and no marker is written.

Lifecycle: the job name is derived from the output artifact, so a retry of the launcher finds the
job of the attempt before it: an identical job that has not failed is adopted, anything else is
deleted and created anew (training resumes from the checkpoints). A Failed condition raises
`TrainJobFailed` with the reason, the message and where to read the pods' logs; the failed job is
kept for inspection. API-server blips (5xx, resets) are ridden out for 15 minutes. SIGTERM (the run
cancelled, the launcher pod evicted) or any other error of the launcher deletes the TrainJob, so no
GPUs are left running unattended. When the launcher runs in a KFP pod, the TrainJob is also owned
by that pod, so deleting the pod removes it.

The launcher's service account needs create/get/list/watch/delete on `trainjobs.trainer.kubeflow.org`
in its namespace (manifests/base/namespaced/rbac.yaml). The pods run under the same service
account (read from the launcher's token; `FUNMATCH_TRAINJOB_SERVICE_ACCOUNT` overrides), so they
have its GCS access. `FUNMATCH_TRAINJOB_RUNTIME` names another runtime than `funmatch-distill` (e.g.
the upstream `torch-distributed`, without the priority class); it must have the replicated job and
container `node`.

`kubernetes` and `kubeflow_trainer_api` are imported inside the functions that use them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from funmatch import storage
from funmatch.config import Config
from funmatch.errors import PREEMPTED_EXIT, ConfigError, DataError, FunmatchError
from funmatch.runtime import setup_logging

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME = "funmatch-distill"  # the ClusterTrainingRuntime of manifests/base/cluster (a test keeps them equal)
NODE = "node"  # the runtime's replicated job and container name (trainjob-ancestor-step: trainer)
MANAGER = "funmatch.dev/distill-launcher"  # owner of our runtimePatches entry
MARKER = "_FUNMATCH_COMPLETE"  # written last into a copied tree
SCRATCH = "/scratch"  # node-local disk for the fetched inputs
WORKER_CACHE = f"{SCRATCH}/funmatch"
# Same CPU / memory requests as the single-node GPU task (pipelines/funmatch_pipeline.py: on_gpu_pool).
CPU_REQUEST, MEMORY_REQUEST = "8", "48Gi"
FORWARDED_ENV = ("GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST")  # what storage.gcs_client reads
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class TrainJobError(FunmatchError):
    """The TrainJob could not be created, failed, or vanished."""


class TrainJobFailed(TrainJobError):
    """The TrainJob has a Failed condition (kept for inspection) or was deleted by someone else."""


class _Cancelled(BaseException):
    """SIGTERM / Ctrl-C while the launcher runs (a BaseException, so no library swallows it)."""


# ---------------------------------------------------------------- the TrainJob


def job_name(key: str) -> str:
    """A stable RFC 1035 name for the job of `key` (the output artifact), e.g. 'funmatch-distill-3fa9c2d17b0e'."""
    return f"funmatch-distill-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def worker_args(
    config_json: str, dataset: str, teacher: str, output: str, checkpoint_dir: str = "", cache_dir: str = WORKER_CACHE
) -> list[str]:
    """The `funmatch` arguments each node runs under torchrun."""
    args = [
        "stage",
        "distill",
        "--config-json",
        config_json,
        "--dataset",
        dataset,
        "--teacher",
        teacher,
        "--output",
        output,
        "--cache-dir",
        cache_dir,
    ]
    return args + (["--checkpoint-dir", checkpoint_dir] if checkpoint_dir else [])


TORCHRUN = ["torchrun", "--module", "funmatch"]  # nodes, procs, rank, master: from the PET_* variables


def build(
    cfg: Config,
    *,
    name: str,
    image: str,
    args: list[str],
    namespace: str = "",
    labels: dict[str, str] | None = None,
    owner: dict[str, str] | None = None,
    service_account: str = "",
    env: dict[str, str] | None = None,
    runtime: str = RUNTIME,
):
    """The typed TrainJob (kubeflow_trainer_api model) running `args` on `cfg.distill.num_nodes` nodes.

    GPUs per node = `cfg.resources.accelerator_count` (one process each); node selector, toleration,
    memory-backed /dev/shm and the deadline come from `cfg.resources`, like the single-node task.
    """
    from kubeflow_trainer_api import models as m

    r = cfg.resources
    q = m.IoK8sApimachineryPkgApiResourceQuantity
    gpus = r.accelerator_count
    limits = {r.accelerator_type: q(str(gpus))} if gpus > 0 else None
    resources = m.IoK8sApiCoreV1ResourceRequirements(
        requests={"cpu": q(CPU_REQUEST), "memory": q(MEMORY_REQUEST)}, limits=limits
    )
    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    pod = m.TrainerV1alpha1PodSpecPatch(
        nodeSelector={r.node_selector_key: r.node_selector_value} if r.node_selector_key else None,
        tolerations=[m.IoK8sApiCoreV1Toleration(key=r.toleration_key, operator="Exists", effect="NoSchedule")]
        if r.toleration_key
        else None,
        volumes=[
            m.IoK8sApiCoreV1Volume(
                name="dshm", emptyDir=m.IoK8sApiCoreV1EmptyDirVolumeSource(medium="Memory", sizeLimit=q(r.shm_size))
            ),
            m.IoK8sApiCoreV1Volume(name="scratch", emptyDir=m.IoK8sApiCoreV1EmptyDirVolumeSource()),
        ],
        containers=[
            m.TrainerV1alpha1ContainerPatch(
                name=NODE,
                volumeMounts=[
                    m.IoK8sApiCoreV1VolumeMount(name="dshm", mountPath="/dev/shm"),
                    m.IoK8sApiCoreV1VolumeMount(name="scratch", mountPath=SCRATCH),
                ],
            )
        ],
        serviceAccountName=service_account or None,
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicatedJobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=NODE,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))
                            ),
                        )
                    ]
                )
            )
        ),
    )
    owners = None
    if owner:
        owners = [
            m.IoK8sApimachineryPkgApisMetaV1OwnerReference(
                apiVersion="v1",
                kind="Pod",
                name=owner["name"],
                uid=owner["uid"],
                blockOwnerDeletion=False,
                controller=False,
            )
        ]
    return m.TrainerV1alpha1TrainJob(
        apiVersion=API_VERSION,
        kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name,
            namespace=namespace or None,
            ownerReferences=owners,
            labels={
                "app.kubernetes.io/managed-by": "funmatch",
                "funmatch.dev/config-hash": cfg.hash(),
                **(labels or {}),
            },
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(name=runtime, kind="ClusterTrainingRuntime", apiGroup=GROUP),
            trainer=m.TrainerV1alpha1Trainer(
                image=image,
                command=list(TORCHRUN),
                args=args,
                numNodes=cfg.distill.num_nodes,
                numProcPerNode=max(gpus, 1),
                resourcesPerNode=resources,
                env=[m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
            ),
            runtimePatches=[patch],
            activeDeadlineSeconds=max(1, int(r.timeout_hours * 3600)),
        ),
    )


def manifest(cfg: Config, **kwargs) -> dict[str, Any]:
    """`build(...)` as the JSON body the API server receives."""
    return build(cfg, **kwargs).to_dict()


# ---------------------------------------------------------------- status


def conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type", "?"): c for c in (obj.get("status") or {}).get("conditions") or []}


def _true(obj: dict, kind: str) -> dict | None:
    c = conditions(obj).get(kind)
    return c if c and c.get("status") == "True" else None


def phase(obj: dict) -> str:
    """Failed | Complete | Suspended | Running | Created (the Kubeflow SDK's names)."""
    for kind in ("Failed", "Complete", "Suspended"):
        if _true(obj, kind):
            return kind
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    return "Running" if any(j.get("active", 0) or j.get("succeeded", 0) for j in jobs) else "Created"


def _jobs_summary(obj: dict) -> str:
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    return "; ".join(
        f"{j.get('name')}: {j.get('active', 0)} active, {j.get('ready', 0)} ready, "
        f"{j.get('succeeded', 0)} succeeded, {j.get('failed', 0)} failed"
        for j in jobs
    )


def logs_hint(namespace: str, name: str) -> str:
    return f"kubectl logs -n {namespace} -l jobset.sigs.k8s.io/jobset-name={name} --prefix --tail=100"


class _Progress:
    """Logs what changed in the TrainJob's status; says when it is finished."""

    def __init__(self, namespace: str, name: str) -> None:
        self.ns, self.name = namespace, name
        self.seen_conditions: dict[str, tuple] = {}
        self.last: tuple = ()

    def update(self, obj: dict) -> str | None:
        """'Complete' once complete; raises TrainJobError once failed; None while it runs."""
        for kind, c in conditions(obj).items():
            key = (c.get("status"), c.get("reason"), c.get("message"))
            if self.seen_conditions.get(kind) != key:
                self.seen_conditions[kind] = key
                log.info(
                    "TrainJob %s/%s condition %s=%s (%s): %s",
                    self.ns,
                    self.name,
                    kind,
                    c.get("status"),
                    c.get("reason", ""),
                    c.get("message", ""),
                )
        now = (phase(obj), _jobs_summary(obj))
        if now != self.last:
            self.last = now
            log.info("TrainJob %s/%s: %s%s", self.ns, self.name, now[0], f" ({now[1]})" if now[1] else "")
        if failed := _true(obj, "Failed"):
            raise TrainJobFailed(
                f"TrainJob {self.ns}/{self.name} failed: {failed.get('reason', 'Failed')}: "
                f"{failed.get('message', '').strip() or 'no message'}. The job is kept for inspection; "
                f"its pods' logs: {logs_hint(self.ns, self.name)}"
            )
        return "Complete" if _true(obj, "Complete") else None


# ---------------------------------------------------------------- Kubernetes API


def _api(api_client=None):
    from kubernetes import client
    from kubernetes import config as kube_config

    if api_client is None:
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        api_client = client.ApiClient()
    return client.CustomObjectsApi(api_client)


def current_namespace() -> str:
    """KFP_NAMESPACE (KFP pods), else the pod's service-account namespace, else kubeconfig's, else 'default'."""
    if os.environ.get("KFP_NAMESPACE"):
        return os.environ["KFP_NAMESPACE"]
    path = Path(SA_DIR) / "namespace"
    if path.is_file():
        return path.read_text().strip()
    try:
        from kubernetes import config as kube_config

        _, context = kube_config.list_kube_config_contexts()
        return context.get("context", {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001 (no or a broken kubeconfig: nothing better to go on)
        return "default"


def own_service_account(token_path: str | Path = Path(SA_DIR) / "token") -> str:
    """FUNMATCH_TRAINJOB_SERVICE_ACCOUNT, else the service account of this pod's token, else ''."""
    if os.environ.get("FUNMATCH_TRAINJOB_SERVICE_ACCOUNT"):
        return os.environ["FUNMATCH_TRAINJOB_SERVICE_ACCOUNT"]
    try:
        payload = Path(token_path).read_text().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, IndexError, ValueError):
        return ""
    bound = (claims.get("kubernetes.io") or {}).get("serviceaccount") or {}
    return bound.get("name") or claims.get("kubernetes.io/serviceaccount/service-account.name", "")


def _kfp_pod() -> dict[str, str] | None:
    """The launcher's own pod in a KFP run (the executor sets KFP_POD_NAME / KFP_POD_UID)."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    return {"name": name, "uid": uid} if name and uid else None


def _explain(e, what: str, namespace: str) -> TrainJobError:
    """An ApiException as one line that says what to do."""
    body = ""
    try:
        body = json.loads(e.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        body = str(e.body or "")[:500]
    hint = {
        403: f"the pipeline's service account needs create/get/list/watch/delete on "
        f"trainjobs.{GROUP} in namespace {namespace} (manifests/base/namespaced/rbac.yaml)",
        404: f"is Kubeflow Trainer v2 ({API_VERSION}) installed on this cluster?",
        422: "the cluster rejected the TrainJob (Trainer version other than v2.3?)",
    }.get(e.status, "")
    return TrainJobError(
        f"cannot {what}: HTTP {e.status} {e.reason}: {body}".rstrip(": ") + (f"; {hint}" if hint else "")
    )


def _short(e: BaseException) -> str:
    """An exception in one line (ApiException's str is a multi-line dump)."""
    status = getattr(e, "status", None)
    if status is not None and hasattr(e, "reason"):
        return f"HTTP {status} {getattr(e, 'reason', '')}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _get(api, namespace: str, name: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        if e.status in (401, 403):
            raise _explain(e, f"read TrainJob {namespace}/{name}", namespace) from None
        raise


def _get_patiently(api, namespace: str, name: str, outage_s: float, retry_s: float) -> dict | None:
    """`_get`, riding out API-server restarts and network blips (5xx, 429, resets) for up to `outage_s`."""
    since = None
    while True:
        try:
            return _get(api, namespace, name)
        except TrainJobError:
            raise
        except Exception as e:  # noqa: BLE001 (any API-server or network failure is retried until outage_s)
            since = since or time.monotonic()
            if time.monotonic() - since > outage_s:
                raise TrainJobError(
                    f"cannot read TrainJob {namespace}/{name} for {outage_s:.0f}s: {_short(e)}"
                ) from None
            log.warning("reading TrainJob %s/%s: %s; retrying in %gs", namespace, name, _short(e), retry_s)
            time.sleep(retry_s)


def delete(api, namespace: str, name: str) -> bool:
    """Deletes the TrainJob with its JobSet and pods (foreground); False when it was not there."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=client.V1DeleteOptions(propagation_policy="Foreground")
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise _explain(e, f"delete TrainJob {namespace}/{name}", namespace) from None
    log.info("TrainJob %s/%s deleted", namespace, name)
    return True


def _wait_gone(api, namespace: str, name: str, timeout_s: float, poll_s: float) -> None:
    end = time.monotonic() + timeout_s
    while _get(api, namespace, name) is not None:
        if time.monotonic() > end:
            raise TrainJobError(f"TrainJob {namespace}/{name} is still being deleted after {timeout_s:.0f}s")
        time.sleep(poll_s)


def create(api, body: dict, *, poll_s: float = 2.0, delete_timeout_s: float = 600.0) -> dict:
    """Creates the TrainJob; an earlier attempt's job of the same name is adopted or replaced."""
    from kubernetes.client.exceptions import ApiException

    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for attempt in range(2):
        try:
            created = api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
            log.info(
                "TrainJob %s/%s created: %d nodes × %s, runtime %s",
                ns,
                name,
                body["spec"]["trainer"]["numNodes"],
                body["spec"]["trainer"]["numProcPerNode"],
                body["spec"]["runtimeRef"]["name"],
            )
            return created
        except ApiException as e:
            if e.status != 409 or attempt:
                raise _explain(e, f"create TrainJob {ns}/{name}", ns) from None
        existing = _get(api, ns, name)
        if existing is None:
            continue
        same = (existing.get("spec") or {}).get("trainer") == body["spec"]["trainer"]
        if same and phase(existing) != "Failed" and not (existing.get("metadata") or {}).get("deletionTimestamp"):
            log.info("TrainJob %s/%s exists from an earlier attempt (%s): adopting it", ns, name, phase(existing))
            return existing
        log.info(
            "TrainJob %s/%s exists from an earlier attempt (%s%s): replacing it",
            ns,
            name,
            phase(existing),
            "" if same else ", different spec",
        )
        delete(api, ns, name)
        _wait_gone(api, ns, name, delete_timeout_s, poll_s)
    raise TrainJobError(f"cannot create TrainJob {ns}/{name}")  # not reached


def wait(
    api,
    namespace: str,
    name: str,
    *,
    watch_timeout_s: int = 300,
    retry_s: float = 5.0,
    timeout_s: float | None = None,
    outage_s: float = 900.0,
) -> dict:
    """Follows the TrainJob (GET, then a watch from its resourceVersion, again and again) until it is
    Complete; logs every change of its conditions and nodes; raises TrainJobError when it fails,
    disappears, the API server is unreachable for `outage_s`, or `timeout_s` passes."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    progress = _Progress(namespace, name)
    start = time.monotonic()
    while True:
        obj = _get_patiently(api, namespace, name, outage_s, retry_s)
        if obj is None:
            raise TrainJobFailed(f"TrainJob {namespace}/{name} was deleted while the distill task waited for it")
        if progress.update(obj):
            return obj
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TrainJobError(
                f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s (still {phase(obj)})"
            )
        try:
            w = watch.Watch()
            for event in w.stream(
                api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=(obj.get("metadata") or {}).get("resourceVersion"),
                timeout_seconds=watch_timeout_s,
            ):
                if event["type"] == "DELETED":
                    raise TrainJobFailed(
                        f"TrainJob {namespace}/{name} was deleted while the distill task waited for it"
                    )
                if event["type"] in ("ADDED", "MODIFIED") and progress.update(event["raw_object"]):
                    return event["raw_object"]
        except TrainJobError:
            raise
        except ApiException as e:
            if e.status != 410:  # 410 Gone: the resourceVersion expired; GET again
                log.warning("watching TrainJob %s/%s: %s; retrying in %gs", namespace, name, _short(e), retry_s)
                time.sleep(retry_s)
        except Exception as e:  # noqa: BLE001 (connection reset, proxy timeout: the next GET catches up)
            log.warning("watching TrainJob %s/%s: %s; retrying in %gs", namespace, name, _short(e), retry_s)
            time.sleep(retry_s)


@contextlib.contextmanager
def _cancel_on_sigterm() -> Iterator[None]:
    def handle(signum, frame):
        raise _Cancelled(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: no handler (the TrainJob then outlives a cancel)
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- moving trees (local paths and gs://)


def _join(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


def _copy_file(src: str, dst: str) -> None:
    """One file between local paths and gs:// (storage's retried, checksum-verified transfers)."""
    if not storage.is_gcs(dst):
        storage.download_file(src, dst)  # a local source is copied; the file appears whole
    elif storage.is_gcs(src):
        with tempfile.TemporaryDirectory() as tmp:
            storage.upload_file(storage.download_file(src, Path(tmp, "object")), dst)
    else:
        storage.upload_file(src, dst)


def complete(uri: str) -> bool:
    """Whether a tree copied by `copy_tree` (or published by a worker) is whole."""
    return storage.exists(_join(uri, MARKER))


def copy_tree(src: str, dst: str, *, marker: bool = True) -> int:
    """Copies every file below `src` to `dst` (each a directory or gs:// prefix), the marker last."""
    src = src.rstrip("/")
    files = [f for f in storage.list_files(src) if Path(f).name != MARKER]
    if not files:
        raise DataError(f"{src!r} holds no files")
    for f in files:
        _copy_file(f, _join(dst, f[len(src) + 1 :]))
    if marker:
        storage.write_bytes(_join(dst, MARKER), json.dumps({"source": src, "files": len(files)}).encode())
    return len(files)


def _stage(uri: str, staged: str, role: str) -> str:
    """A location the TrainJob's pods can read: `uri` itself if gs://, else a copy at `staged`."""
    if storage.is_gcs(uri):
        return uri
    if complete(staged):
        log.info("%s already staged at %s", role, staged)
    else:
        n = copy_tree(uri, staged)
        log.info("%s staged for the TrainJob: %d files → %s", role, n, staged)
    return staged


# ---------------------------------------------------------------- the launcher (the distill task)


def artifact_location(artifact) -> str:
    """A KFP artifact's gs:// URI when it has one (the pods read it there), else its local path."""
    uri = getattr(artifact, "uri", "") or ""
    return uri if storage.is_gcs(uri) else str(artifact.path)


def launch_distill(
    cfg: Config, dataset, teacher, student, checkpoint_root: str, checkpoint_dir: str, image: str, **kwargs
) -> dict:
    """`tasks.distill` with `distill.num_nodes > 1`: the TrainJob trains, the task copies the student."""
    if not storage.is_gcs(checkpoint_root):
        raise ConfigError(
            f"distill.num_nodes={cfg.distill.num_nodes} is not allowed with checkpoint_root={checkpoint_root!r}: "
            "expected a gs:// URI, through which the TrainJob's pods read the data and the teacher and write "
            "checkpoints and the student (or distill.num_nodes=1)"
        )
    kwargs.setdefault("runtime", os.environ.get("FUNMATCH_TRAINJOB_RUNTIME") or RUNTIME)
    return run(
        cfg,
        dataset=artifact_location(dataset),
        teacher=artifact_location(teacher),
        out_dir=student.path,
        shared_root=f"{checkpoint_root.rstrip('/')}/{cfg.hash()}/trainjob",
        checkpoint_dir=checkpoint_dir,
        image=image,
        key=getattr(student, "uri", "") or str(student.path),
        **kwargs,
    )


def run(
    cfg: Config,
    *,
    dataset: str,
    teacher: str,
    out_dir: str | Path,
    shared_root: str,
    checkpoint_dir: str,
    image: str,
    key: str,
    namespace: str = "",
    api_client=None,
    runtime: str = RUNTIME,
    watch_timeout_s: int = 300,
    retry_s: float = 5.0,
    timeout_s: float | None = None,
    outage_s: float = 900.0,
) -> dict:
    """Stages the inputs, creates the TrainJob, follows it, copies the student into `out_dir`;
    returns the student's info (its model.json). `shared_root` is where the pods and the launcher
    meet (gs:// in a cluster; any directory in tests)."""
    setup_logging()
    api = _api(api_client)
    namespace = namespace or current_namespace()
    name = job_name(key)
    where = _join(shared_root, name)
    created = False  # from the POST on, a cancel or an error of the launcher deletes the TrainJob
    with _cancel_on_sigterm():
        try:
            inputs = {
                role: _stage(uri, _join(where, role), role)
                for role, uri in (("dataset", dataset), ("teacher", teacher))
            }
            output = _join(where, "student")
            body = manifest(
                cfg,
                name=name,
                namespace=namespace,
                image=image,
                runtime=runtime,
                args=worker_args(cfg.to_json(), inputs["dataset"], inputs["teacher"], output, checkpoint_dir),
                owner=_kfp_pod(),
                service_account=own_service_account(),
                env={k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)},
            )
            created = True
            create(api, body, poll_s=min(retry_s, 2.0))
            wait(
                api,
                namespace,
                name,
                watch_timeout_s=watch_timeout_s,
                retry_s=retry_s,
                timeout_s=timeout_s,
                outage_s=outage_s,
            )
        except (_Cancelled, KeyboardInterrupt) as e:
            log.warning(
                "%s: cancelling TrainJob %s/%s", e if isinstance(e, _Cancelled) else "interrupted", namespace, name
            )
            if created:
                _delete_quietly(api, namespace, name)
            raise SystemExit(PREEMPTED_EXIT) from None
        except TrainJobFailed:
            raise
        except BaseException:
            if created:
                _delete_quietly(api, namespace, name)
            raise
    if not (complete(output) if storage.is_gcs(output) else (Path(output) / "model.json").is_file()):
        raise TrainJobError(
            f"TrainJob {namespace}/{name} completed but its student at {output} is incomplete "
            f"(no {MARKER}); its pods' logs: {logs_hint(namespace, name)}"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    n = copy_tree(output, str(out_dir), marker=False)
    info = json.loads((Path(out_dir) / "model.json").read_text())
    log.info("student of TrainJob %s/%s copied into the output artifact (%d files)", namespace, name, n)
    return info


def _delete_quietly(api, namespace: str, name: str) -> None:
    try:
        delete(api, namespace, name)
    except Exception as e:  # noqa: BLE001 (the original error matters more)
        log.warning("could not delete TrainJob %s/%s: %s", namespace, name, e)


# ---------------------------------------------------------------- the worker (each TrainJob process)


def _node_copy(uri: str, cache: Path, role: str) -> str:
    """A local directory holding `uri`: a gs:// prefix is fetched once per node (and per URI) into
    `cache`; local paths are used as they are."""
    if not storage.is_gcs(uri):
        if not Path(uri).is_dir():
            raise DataError(f"{uri!r} does not exist or is not a directory")
        return uri
    import fcntl

    dest = cache / f"{role}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:  # the node's other processes wait here
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete(str(dest)):
            n = copy_tree(uri, str(dest))
            log.info("fetched %s: %d files → %s", uri, n, dest)
    return str(dest)


def run_worker(
    config_json: str, dataset: str, teacher: str, output: str, checkpoint_dir: str = "", cache_dir: str = ""
) -> dict:
    """`funmatch stage distill`: one process of the TrainJob (or a plain single process)."""
    from funmatch import config
    from funmatch.stages import distill as stage

    setup_logging()
    cfg = config.from_json(config_json)
    cache = Path(cache_dir or os.environ.get("FUNMATCH_CACHE_DIR") or Path(tempfile.gettempdir(), "funmatch-stage"))
    rank = int(os.environ.get("RANK", "0"))
    if storage.is_gcs(output):
        cache.mkdir(parents=True, exist_ok=True)
        local_out = Path(tempfile.mkdtemp(dir=cache, prefix=f"student-rank{rank}-"))
    else:
        local_out = Path(output)
    info = stage.run(
        cfg,
        _node_copy(dataset, cache, "dataset"),
        _node_copy(teacher, cache, "teacher"),
        local_out,
        checkpoint_dir=checkpoint_dir,
    )
    if rank == 0 and storage.is_gcs(output):  # a local --output (one node) already holds the student
        copy_tree(str(local_out), output)
        log.info("student published to %s", output)
    return info
