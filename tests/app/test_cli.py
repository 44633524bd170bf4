"""Bad input: one clear line, exit code 2, before any compute."""

import json

import pytest

from funmatch.app import cli


@pytest.mark.parametrize(
    "argv, words",
    [
        (["run", "--preset", "no-such-preset"], ["no-such-preset"]),
        (["run", "--set", "distill.epochz=3"], ["distill.epochz", "distill.epochs"]),
        (["run", "--set", "distill.epochs=three"], ["distill.epochs", "three"]),
        (["run", "--set", "data.source=/no/such/dir"], ["/no/such/dir"]),
        (["run", "--set", "distill.setup=teleport"], ["teleport"]),
        (["run", "--set", "teacher.init=/no/teacher.npz"], ["teacher.init", "/no/teacher.npz"]),
        (["run", "--set", "teacher.arch=timm:resnet10"], ["teacher.arch", "did you mean timm:resnet10t"]),
        (["compile", "--set", "student.resolution=33", "--output", "x.yaml"], ["student.resolution", "33"]),
    ],
)
def test_bad_input_is_one_clear_line(argv, words, capsys, tmp_path):
    assert cli.main(argv + (["--output", str(tmp_path / "out")] if argv[0] == "run" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("funmatch: error:") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_teacher_checkpoint_that_does_not_fit(tmp_path, capsys, teacher_dir):
    weights = teacher_dir / "member-0.safetensors"
    assert (
        cli.main(
            ["run", "--output", str(tmp_path), "--set", f"teacher.init={weights}", "--set", "teacher.arch=bit-r14-mini"]
        )
        == 2
    )
    assert "does not fit bit-r14-mini" in capsys.readouterr().err


def test_presets_json_and_text(capsys):
    assert cli.main(["presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)["presets"]
    assert presets["demo"]["config"]["distill"]["setup"] == "funmatch"
    assert cli.main(["presets"]) == 0
    assert "expected: student/test/prec@1" in capsys.readouterr().out


def test_compile_writes_yaml(tmp_path, capsys):
    assert cli.main(["compile", "--output", str(tmp_path / "p.yaml"), "--set", "distill.epochs=3"]) == 0
    assert "distill_epochs" in (tmp_path / "p.yaml").read_text()


def test_compile_no_cache_turns_caching_off_on_every_task(tmp_path, capsys):
    import yaml

    assert cli.main(["compile", "--preset", "demo-tiny", "--output", str(tmp_path / "p.yaml"), "--no-cache"]) == 0
    assert "KFP caching off" in capsys.readouterr().out
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text().split("\n---")[0])
    dags = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
    tasks = [
        t
        for d in dags
        for t in d["dag"]["tasks"].values()
        if "executorLabel" in spec["components"][t["componentRef"]["name"]]
    ]
    assert tasks and not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks)


@pytest.mark.parametrize("verb", ["submit", "schedule"])
def test_submit_and_schedule_help_document_namespace_and_caching(verb, capsys):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--namespace NS" in out and "Kubeflow profile namespace (multi-user KFP)" in out
    assert "--cache" in out and "caching off on every task" in out


def test_help_documents_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "compile", "presets"):
        assert cmd in out
