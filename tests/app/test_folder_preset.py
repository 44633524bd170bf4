"""`funmatch run` / `compile` without --preset on a user's folder take the `folder` preset and say so; a run
the quality gate stops ends with what to change. No training here: compile only, and a run whose pipeline is
replaced by one the gate stops."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from funmatch import config
from funmatch.app import cli
from funmatch.errors import FunmatchError


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((40 + 10 * i, 60, 3), 80 * c + i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _compiled_config(path) -> dict:
    """The resolved config JSON a compiled pipeline carries (a default of its config parameter)."""
    for doc in yaml.safe_load_all(path.read_text()):
        if found := _find_config(doc):
            return found
    raise AssertionError(f"no config in {path}")


def _find_config(node) -> dict | None:
    if isinstance(node, dict):
        for value in node.values():
            if found := _find_config(value):
                return found
    elif isinstance(node, list):
        for value in node:
            if found := _find_config(value):
                return found
    elif isinstance(node, str) and node.startswith("{") and '"preset"' in node:
        return json.loads(node)
    return None


def test_compile_on_a_folder_takes_the_folder_preset(folder, tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    assert cli.main(["compile", "--set", f"data.source={folder}", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"funmatch: preset folder (data.source={folder} is your own images")
    assert "--preset demo" in lines[0] and "(preset folder, config" in lines[1]
    cfg = _compiled_config(out)
    assert cfg["preset"] == "folder" and cfg["data"]["source"] == str(folder)
    assert cfg["data"]["stored_resolution"] == 104 and cfg["distill"]["epochs"] == 0  # derived / to derive


@pytest.mark.parametrize(
    "argv, preset",
    [
        (["--preset", "demo"], "demo"),  # the old behaviour, asked for
        ([], "demo"),  # no data.source: the demo
    ],
)
def test_explicit_preset_or_no_folder_keeps_the_demo(argv, preset, folder, tmp_path, capsys):
    sets = ["--set", f"data.source={folder}"] if argv else []
    assert cli.main(["compile", *argv, *sets, "--output", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "preset folder" not in out and f"(preset {preset}, config" in out
    assert _compiled_config(tmp_path / "p.yaml")["preset"] == preset


def test_a_run_stopped_by_the_gate_says_what_to_change(folder, tmp_path, capsys, monkeypatch):
    from pipelines import local

    def stopped(cfg, out, verbose=False):
        raise FunmatchError(
            "the quality gate stopped the run before export: student test prec@1 0.4800 < gate.min_teacher_ratio=0.9"
            " × teacher 0.6200 = 0.5580"
        )

    monkeypatch.setattr(local, "run", stopped)
    assert cli.main(["run", "--set", f"data.source={folder}", "--output", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert "funmatch: note: the teacher (bit-r18-mini) is trained from scratch" in captured.out
    assert "--set teacher.init=<file> teacher.finetune=false" in captured.out
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("funmatch: error: the quality gate stopped the run")
    cap = config.load("folder").distill.max_images
    for advice in ("a pretrained teacher", f"distill.max_images={2 * cap}", "teacher.resolution=96"):
        assert advice in err


def test_gate_advice_follows_the_config():
    given = config.load("demo", ["teacher.init=/t.safetensors", "teacher.finetune=false", "distill.epochs=40"])
    advice = cli.gate_advice(given)
    assert "pretrained teacher" not in advice and "distill.epochs=80" in advice
    assert "teacher.resolution=64 student.resolution=64" in advice
    derived = cli.gate_advice(config.load("folder", ["distill.max_images=0"]))
    assert f"distill.max_images={2 * config.PATIENT_IMAGES}" in derived and "pretrained teacher" in derived
