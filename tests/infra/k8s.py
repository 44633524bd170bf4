"""Validators for Kubernetes objects. Each returns a list of error strings (empty: valid).

- Built-in kinds: the Kubernetes OpenAPI schemas (pip `kubernetes-validate`, strict: unknown fields
  rejected) for the oldest and newest minor we support, plus ObjectMeta rules no schema expresses.
- Kubeflow Trainer kinds: the v2.3.0 CRDs vendored in manifests/schemas/ as the API server applies them
  on create (jsonschema, strict, structural defaults, CEL rules via pip `cel-python`, list-map keys), and
  a round trip through the published `kubeflow-trainer-api` models.
- Pod rules checked only when pods are created, and RBAC evaluated like the API server's authorizer.
"""

import copy
import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from .kustomize import CLUSTER_SCOPED_KINDS, group_version
from .paths import CRD_DIR, K8S_VERSIONS, TRAINER_GROUP

if TYPE_CHECKING:
    import celpy

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


# --- custom resources: the CRD's schema, defaults and CEL rules ------------------------------------------


def _strict_schema(node: Any) -> Any:
    """Unknown fields are errors (kubectl's default --validate=strict); `nullable` honoured."""
    if isinstance(node, list):
        return [_strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {
        k: (
            v
            if k in ("enum", "default", "example", "required", "x-kubernetes-list-map-keys")
            else {pk: _strict_schema(pv) for pk, pv in v.items()}
            if k == "properties"
            else _strict_schema(v)
        )
        for k, v in node.items()
    }
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            props.setdefault(field, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _apply_defaults(schema: dict, value: object) -> object:
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
def _cel_program(rule: str) -> "celpy.Runner":
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _semantic_errors(schema: dict, value: Any, path: str) -> list[str]:
    """CEL x-kubernetes-validations (create: rules on oldSelf are skipped) and list-map/set uniqueness."""
    import celpy

    errs = []
    for v in schema.get("x-kubernetes-validations", []):
        if re.search(r"\boldSelf\b", v["rule"]):
            continue
        try:
            result: object = _cel_program(v["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # noqa: BLE001 (an evaluation error rejects the object on the server too)
            result = e
        if isinstance(result, Exception) or not bool(result):  # celpy.CELEvalError is an Exception
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
            keys = [
                tuple(json.dumps(item.get(k), sort_keys=True) for k in schema["x-kubernetes-list-map-keys"])
                for item in value
            ]
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

    def __init__(self, crd_file: Path) -> None:
        crd = next(d for d in yaml.safe_load_all(crd_file.read_text()) if d)
        assert crd["kind"] == "CustomResourceDefinition", crd_file
        self.group, self.kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        self.cluster_scoped = crd["spec"]["scope"] == "Cluster"
        self.schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v.get("served")}
        self.validators = {name: jsonschema.Draft4Validator(_strict_schema(s)) for name, s in self.schemas.items()}

    def errors(self, obj: dict) -> list[str]:
        group, version = group_version(obj.get("apiVersion", ""))
        if (group, obj.get("kind")) != (self.group, self.kind) or version not in self.schemas:
            return [
                (
                    f"{obj.get('apiVersion')}/{obj.get('kind')} is not served by the {self.kind} CRD "
                    f"({self.group} {sorted(self.schemas)})"
                )
            ]
        errs = metadata_errors(obj, self.cluster_scoped)
        for e in sorted(self.validators[version].iter_errors(obj), key=lambda e: list(e.absolute_path)):
            errs.append(f"/{'/'.join(map(str, e.absolute_path))}: {e.message}")
        if not errs:
            schema = self.schemas[version]
            errs += _semantic_errors(schema, _apply_defaults(schema, copy.deepcopy(obj)), "")
        return errs


@functools.cache
def crd_validators() -> dict[str, CRDValidator]:
    """The vendored Kubeflow Trainer CRDs, by kind."""
    return {
        v.kind: v
        for v in (
            CRDValidator(CRD_DIR / "trainer.kubeflow.org_clustertrainingruntimes.yaml"),
            CRDValidator(CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml"),
        )
    }


def _lost(orig: object, back: object, path: str = "") -> list[str]:
    """Where `back` (a round trip) differs from `orig`: fields dropped or changed."""
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [f"{path or '/'}: became {type(back).__name__}"]
        return [
            e
            for k, v in orig.items()
            for e in (_lost(v, back[k], f"{path}/{k}") if k in back else [f"{path}/{k}: unknown to the API"])
        ]
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [f"{path}: list changed"]
        return [e for i, (a, b) in enumerate(zip(orig, back, strict=True)) for e in _lost(a, b, f"{path}/{i}")]
    return [] if orig == back else [f"{path}: {orig!r} became {back!r}"]


def trainer_api_errors(obj: dict) -> list[str]:
    """Round trip through the published typed models (pip kubeflow-trainer-api, what the Kubeflow SDK
    builds TrainJobs with): wrong types raise, fields the API does not have are dropped."""
    from kubeflow_trainer_api import models

    cls = {
        "ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime,
        "TrainJob": models.TrainerV1alpha1TrainJob,
    }[obj["kind"]]
    try:
        back = cls.from_dict(copy.deepcopy(obj)).to_dict()
    except Exception as e:  # noqa: BLE001 (pydantic.ValidationError and friends)
        return [f"kubeflow-trainer-api: {type(e).__name__}: {e}"]
    return [f"kubeflow-trainer-api: {e}" for e in _lost(obj, back)]


def manifest_errors(obj: dict) -> list[str]:
    """Every check that applies to one object; an object of a kind nobody validates is an error."""
    group, _ = group_version(obj.get("apiVersion", ""))
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


# --- RBAC ------------------------------------------------------------------------------------------------


def _rule_allows(rule: dict, verb: str, group: str, resource: str) -> bool:
    return (
        (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
        and (resource in rule.get("resources", []) or "*" in rule.get("resources", []))
        and (verb in rule["verbs"] or "*" in rule["verbs"])
        and not rule.get("resourceNames")
    )


def allowed(
    objs: list[dict], account: tuple[str, str], verb: str, group: str, resource: str, namespace: str | None
) -> bool:
    """RBAC as the API server's authorizer evaluates it (namespace None: a cluster-scoped resource).
    `account` is (namespace, name). A RoleBinding's ServiceAccount subject without a namespace means the
    binding's namespace."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["kind"] in ("Role", "ClusterRole")
    }
    for b in objs:
        if b["kind"] == "RoleBinding" and b["metadata"]["namespace"] != namespace:
            continue
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        bound_ns = b["metadata"].get("namespace")
        if not any(
            s["kind"] == "ServiceAccount" and (s.get("namespace") or bound_ns, s["name"]) == account
            for s in b["subjects"]
        ):
            continue
        ref = b["roleRef"]
        role = roles.get((ref["kind"], bound_ns if ref["kind"] == "Role" else None, ref["name"]))
        if role and any(_rule_allows(r, verb, group, resource) for r in role["rules"]):
            return True
    return False
