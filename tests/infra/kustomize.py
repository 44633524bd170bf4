"""A kustomize subset: exactly the features manifests/ uses, with kustomize v5's semantics.

`render(path)` is `kubectl kustomize path` for resources, components, patches (strategic-merge without
lists, JSON 6902), namespace, labels and images; anything else raises KustomizeError, never is ignored.
test_kustomize.py cross-checks it against the real `kubectl kustomize` where kubectl exists.
"""

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .paths import MANIFESTS


class KustomizeError(ValueError):
    pass


# Kinds kustomize knows to be cluster-scoped (from its built-in schema). Every other kind, custom
# resources included, gets the `namespace:` of a kustomization: why manifests/base keeps the
# ClusterTrainingRuntime out of the namespaced sub-kustomization.
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "Node",
    "PersistentVolume",
    "StorageClass",
    "CSIDriver",
    "RuntimeClass",
    "PriorityClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "IngressClass",
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


def group_version(api_version: str) -> tuple[str, str]:
    """'trainer.kubeflow.org/v1alpha1' -> ('trainer.kubeflow.org', 'v1alpha1'); 'v1' -> ('', 'v1')."""
    group, sep, version = api_version.partition("/")
    return (group, version) if sep else ("", api_version)


def _matches(r: dict, target: dict, where: Path) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise KustomizeError(f"{where}: patch target field(s) {sorted(unsupported)} not supported")
    group, version = group_version(r["apiVersion"])
    have = {
        "group": group,
        "version": version,
        "kind": r["kind"],
        "name": r["metadata"]["name"],
        "namespace": r["metadata"].get("namespace"),
    }
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
            targets = [
                r
                for r in acc
                if r["apiVersion"] == body.get("apiVersion")
                and r["kind"] == body.get("kind")
                and r["metadata"]["name"] == meta.get("name")
                and r["metadata"].get("namespace") == meta.get("namespace")
            ]
        for r in targets:
            _merge(r, body)
    else:
        raise KustomizeError(f"{f}: patch {spec} is neither a list nor a mapping")
    if not targets:
        raise KustomizeError(f"{f}: patch {spec} matches no resource")


def _refuse_lists(node: object, f: Path, path: str = "") -> None:
    if isinstance(node, list):
        raise KustomizeError(
            f"{f}: list at {path or '/'} in a strategic-merge patch (merge keys are not "
            "modelled here): use a JSON 6902 patch"
        )
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
    parent: Any = doc
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
    accounts = {
        (r["metadata"]["name"], r["metadata"].get("namespace", "")) for r in acc if r["kind"] == "ServiceAccount"
    }
    for r in acc:
        if r["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for s in r.get("subjects", []):
                if s.get("kind") == "ServiceAccount" and (s["name"], s.get("namespace", "")) in accounts:
                    s["namespace"] = namespace
    for r in acc:
        if r["kind"] not in CLUSTER_SCOPED_KINDS:
            r["metadata"]["namespace"] = namespace


def _add_labels(f: Path, spec: dict, acc: list[dict]) -> None:
    if (
        set(spec) - {"pairs", "includeSelectors", "includeTemplates"}
        or spec.get("includeSelectors")
        or spec.get("includeTemplates")
    ):
        raise KustomizeError(f"{f}: labels {spec}: only plain `pairs` (metadata.labels) are supported")
    for r in acc:
        r["metadata"].setdefault("labels", {}).update(spec["pairs"])


def split_image(image: str) -> tuple[str, str]:
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

    def retag(container: dict) -> None:
        name, ref = split_image(container["image"])
        if name != spec["name"]:
            return
        if spec.get("digest"):
            ref = f"@{spec['digest']}"
        elif spec.get("newTag"):
            ref = f":{spec['newTag']}"
        container["image"] = spec.get("newName", name) + ref

    _walk_containers(acc, retag)


def _walk_containers(node: object, fn: Callable[[dict], None]) -> None:
    """fn on every container (or init container) with an image, at any depth of node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        fn(c)
            _walk_containers(value, fn)
    elif isinstance(node, list):
        for item in node:
            _walk_containers(item, fn)


# --- the repository's manifests, rendered -------------------------------------------------------------


@functools.cache
def rendered(which: str) -> tuple[dict, ...]:
    """Rendered manifests of manifests/<which> (cached; callers get deep copies)."""
    return tuple(render(MANIFESTS / which))


def objects(which: str) -> list[dict]:
    """A fresh (deep) copy of manifests/<which> rendered: callers may mutate it."""
    return copy.deepcopy(list(rendered(which)))


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of `kind` (and `name`, if given) in objs."""
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]
