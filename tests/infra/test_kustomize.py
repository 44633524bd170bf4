"""The kustomize subset of kustomize.py (renders manifests/ for the other tests).

Where kubectl exists, every rendering (the repository's overlays and the small trees built here) must
equal the real `kubectl kustomize` output; without it, the renderer is still pinned by the semantics
asserted below (namespace transformer, patches, labels, images) and must refuse anything it does not model.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .kustomize import KustomizeError, find, objects, render
from .paths import MANIFESTS, RENDER_DIRS


@pytest.mark.parametrize("which", RENDER_DIRS)
def test_renderer_matches_kubectl_kustomize(which):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the renderer's own tests below still run")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / which)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out.stdout) if d)
    ours = sorted(json.dumps(d, sort_keys=True) for d in objects(which))
    assert ours == theirs


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


SA = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: runner\n"
BINDING = (
    "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: b\n"
    "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: r}\n"
    "subjects:\n- {kind: ServiceAccount, name: runner}\n- {kind: ServiceAccount, name: other}\n"
)
RUNTIME = (
    "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: ClusterTrainingRuntime\nmetadata:\n  name: rt\n"
    "spec:\n  template:\n    spec:\n      containers:\n      - {name: a, image: 'reg.io:5000/x/img:1'}\n"
    "      - {name: b, image: other/img}\n      volumes: [{name: v1}]\n"
)


def _kubectl_agrees(root: Path, ours: list[dict]) -> None:
    """Where kubectl exists, its kustomize must render the same objects."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(root)], check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(out.stdout) if d)
        assert sorted(json.dumps(d, sort_keys=True) for d in ours) == theirs


def test_renderer_namespace_moves_bound_accounts_and_stamps_unknown_kinds(tmp_path):
    _write_tree(
        tmp_path,
        {
            "kustomization.yaml": "namespace: ns1\nresources: [sa.yaml, b.yaml, rt.yaml]\n",
            "sa.yaml": SA,
            "b.yaml": BINDING,
            "rt.yaml": RUNTIME,
        },
    )
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


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"kustomization.yaml": _k("resources: [sa.yaml]", "configMapGenerator: []"), "sa.yaml": SA}, "not supported"),
        ({"kustomization.yaml": _k("resources: [missing.yaml]")}, "not found"),
        ({"kustomization.yaml": _k("resources: [sa.yaml, sa.yaml]"), "sa.yaml": SA}, "duplicate resource"),
        (
            {
                "kustomization.yaml": _k(
                    "resources: [sa.yaml]",
                    "patches:",
                    "- patch: '{apiVersion: v1, kind: ServiceAccount, metadata: {name: runner}, secrets: []}'",
                ),
                "sa.yaml": SA,
            },
            "JSON 6902",
        ),
        (
            {
                "kustomization.yaml": _k(
                    "resources: [sa.yaml]",
                    "patches:",
                    "- patch: '[{op: replace, path: /metadata/labels/x, value: y}]'",
                    "  target: {kind: ServiceAccount}",
                ),
                "sa.yaml": SA,
            },
            "does not exist",
        ),
        (
            {
                "kustomization.yaml": _k(
                    "resources: [sa.yaml]",
                    "patches:",
                    "- patch: '{apiVersion: v1, kind: ServiceAccount, metadata: {name: nobody}}'",
                ),
                "sa.yaml": SA,
            },
            "matches no resource",
        ),
        (
            {
                "kustomization.yaml": _k(
                    "resources: [sa.yaml]", "labels:", "- pairs: {a: b}", "  includeSelectors: true"
                ),
                "sa.yaml": SA,
            },
            "only plain",
        ),
        (
            {"kustomization.yaml": _k("components: [c]"), "c/kustomization.yaml": _k("kind: Kustomization")},
            "expected Component",
        ),
    ],
)
def test_renderer_refuses_what_it_does_not_model(tmp_path, files, message):
    _write_tree(tmp_path, files)
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)
