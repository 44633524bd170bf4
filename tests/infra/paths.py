"""Where the infrastructure lives in the repository, and the few facts about it other modules share:
the tools pip installs, constraints.txt's pins, the package version and the image names the pipeline uses."""

import os
import re
import shutil
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    """pyproject.toml's project version (the default image tag)."""
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
