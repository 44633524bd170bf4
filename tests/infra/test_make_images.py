"""`make images`: run for real (GNU make, the repository's Makefile) against fake `docker`/`podman`
executables that record their arguments: it builds and pushes exactly the images the compiled pipeline
runs (components.image()), picks the engine, honours PUSH=0 and stops at the first failed build.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .paths import ROOT, expected_image, project_version


def _fake_engines(tmp_path: Path, names: tuple[str, ...], fail_build: bool = False) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in names:
        exe = bin_dir / name
        exe.write_text(
            f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
            + ('[ "$1" = build ] && exit 1\n' if fail_build else "")
            + "exit 0\n"
        )
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    # PATH without any real docker/podman (this machine has a docker client in /usr/local/bin)
    keep = [
        p
        for p in os.environ["PATH"].split(os.pathsep)
        if p and not any(os.access(os.path.join(p, e), os.X_OK) for e in ("docker", "podman"))
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "CONTAINER_ENGINE",
            "REGISTRY",
            "TAG",
            "PUSH",
            "PLATFORM",
            "MAKEFLAGS",
            "MFLAGS",
            "FUNMATCH_IMAGE_PREFIX",
            "FUNMATCH_IMAGE_TAG",
        )
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), *keep])
    return env, log


def _make_images(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "images", f"PYTHON={sys.executable}", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
        [*build, "images/Dockerfile.cpu", "-t", want["cpu"], "."],
        [engine, "push", want["cpu"]],
        [*build, "images/Dockerfile.cuda", "-t", want["cuda"], "."],
        [engine, "push", want["cuda"]],
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
    assert pushed == [
        expected_image("cpu", "europe-docker.pkg.dev/p/r", "rc1"),
        expected_image("cuda", "europe-docker.pkg.dev/p/r", "rc1"),
    ]


def test_make_images_fails_without_an_engine_or_on_a_failed_build(tmp_path):
    (tmp_path / "none").mkdir()
    env, _ = _fake_engines(tmp_path / "none", ())
    out = _make_images(env)
    assert out.returncode != 0 and "neither docker nor podman" in out.stderr
    env, log = _fake_engines(tmp_path, ("podman",), fail_build=True)
    out = _make_images(env, "REGISTRY=r.example/x")
    assert out.returncode != 0
    assert [c[1] for c in _calls(log)] == ["build"]  # stopped at the first failure, nothing pushed
