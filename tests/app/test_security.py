"""A malicious pickle never runs: every way a checkpoint enters is refused before unpickling, and the
code base holds no call that would unpickle (torch.load, pickle, allow_pickle=True, yaml.load)."""

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from funmatch import config
from funmatch.app import cli
from funmatch.errors import CheckpointError, ConfigError
from funmatch.recipe import models
from funmatch.storage.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]


class Canary:
    """Unpickling this creates the file `path` (open(path, 'w')): proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_canary_fires_when_unpickled(tmp_path):
    """The check below is meaningful: loading this payload with pickle does create the file."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Canary(marker))).close()
    assert marker.exists()


# ---------------------------------------------------------------- teacher.init / student.init


# .pt/.pth/.bin are accepted as state dicts, read with torch.load(weights_only=True): a file that needs full
# unpickling is refused unrun (tests/recipe/test_any_teacher.py)
@pytest.mark.parametrize("name", ["weights.pkl", "ckpt.ckpt", "model.joblib"])
def test_pickle_formats_are_refused_by_config_validation(name):
    with pytest.raises(ConfigError, match=r"teacher.init=.* ending in .npz, .safetensors, .pt, .pth, .bin"):
        config.load("demo-tiny", [f"teacher.init=/models/{name}"])
    with pytest.raises(ConfigError, match=r"student.init"):
        config.load("demo-tiny", [f"student.init=/models/{name}"])


@pytest.mark.parametrize("key", ["resnet/root_block/standardized_conv2d/kernel", "resnet/head/conv2d/kernel"])
def test_npz_with_an_object_array_is_refused_without_unpickling(tmp_path, key):
    marker = tmp_path / "pwned"
    evil = tmp_path / "BiT-evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Canary(marker)
    np.savez(evil, allow_pickle=True, **{key: payload})  # np.savez pickles object arrays
    model = models.create_model("bit-r14-mini", 10)
    with pytest.raises(CheckpointError, match="BiT-evil.npz"):
        models.load_init(model, "bit-r14-mini", str(evil), load_head=True)
    assert not marker.exists()


def test_cli_refuses_a_pickled_npz_teacher_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Canary(marker)
    np.savez(evil, allow_pickle=True, **{"resnet/root_block/standardized_conv2d/kernel": payload})
    rc = cli.main(
        [
            "run",
            "--preset",
            "demo-tiny",
            "--output",
            str(tmp_path / "run"),
            "--set",
            "teacher.arch=bit-r14-mini",
            "--set",
            f"teacher.init={evil}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "teacher.npz" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "run" / "model.onnx").exists()


def test_safetensors_init_that_is_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.safetensors"
    torch.save({"weights": Canary(marker)}, evil)  # what a .pt file is, under a safe name
    model = models.create_model("bit-r14-mini", 10)
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        models.load_init(model, "bit-r14-mini", str(evil), load_head=True)
    assert not marker.exists()


# ---------------------------------------------------------------- step checkpoints


def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters())


@pytest.mark.parametrize("sha_matches", [False, True], ids=["sha-mismatch", "sha-forged"])
def test_checkpoint_that_is_a_pickle_is_skipped(tmp_path, caplog, sha_matches):
    """Newest checkpoint replaced by a pickle: with the old checksum it fails the checksum; with a forged
    one it fails the safetensors parse. Either way it is reported, skipped, and never unpickled."""
    marker = tmp_path / "pwned"
    model, opt = _model_and_opt()
    mgr = CheckpointManager(str(tmp_path / "ckpt"), "cfg")
    mgr.save(5, model, opt)
    mgr.save(10, model, opt)
    blob = pickle.dumps({"model/weight": Canary(marker)})
    (tmp_path / "ckpt" / "ckpt-000000010.safetensors").write_bytes(blob)
    if sha_matches:
        meta_path = tmp_path / "ckpt" / "ckpt-000000010.json"
        meta = json.loads(meta_path.read_text())
        meta["sha256"] = hashlib.sha256(blob).hexdigest()
        meta_path.write_text(json.dumps(meta))
    loaded = mgr.load_latest()
    assert loaded is not None and loaded.step == 5  # the previous, genuine one
    assert ("not a safetensors file" if sha_matches else "checksum mismatch") in caplog.text
    assert not marker.exists()


def test_only_pickle_checkpoints_means_a_fresh_start_not_a_crash(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    blob = pickle.dumps(Canary(marker))
    (ckpt / "ckpt-000000010.safetensors").write_bytes(blob)
    (ckpt / "ckpt-000000010.json").write_text(
        json.dumps({"step": 10, "config_hash": "cfg", "sha256": hashlib.sha256(blob).hexdigest()})
    )
    assert CheckpointManager(str(ckpt), "cfg").load_latest() is None
    assert not marker.exists()


# ---------------------------------------------------------------- the code base stays clean

UNSAFE = {
    # torch.load unpickles unless weights_only=True (tensors and plain containers only: models.read_state_dict)
    r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)": "torch.load unpickles",
    r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b": "a pickle-family import",
    r"\b(c?pickle|dill|cloudpickle|marshal)\.loads?\s*\(": "unpickling",
    r"allow_pickle\s*=\s*True": "np.load with pickle enabled",
    r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\(": "yaml loading beyond safe_load",
    r"\bjoblib\.load\s*\(": "joblib unpickles",
    r"\.load_state_dict_from_url\s*\(|\bhub\.load\s*\(": "downloads and unpickles",
}


def unsafe_lines(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in UNSAFE.items():
                if re.search(pattern, code):
                    found.append(f"{path.relative_to(root.parent)}:{no}: {why}: {line.strip()}")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import pickle\nx = torch.load(f)\nnp.load(p, allow_pickle=True)\n"
        "yaml.load(s, Loader=yaml.Loader)\nok = yaml.safe_load(s)  # torch.load( in a comment\n"
        "np.load(p, allow_pickle=False)\ny = torch.load(f, map_location='cpu', weights_only=True)\n"
    )
    assert [line.split(":")[1] for line in unsafe_lines(pkg)] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("package", ["funmatch", "components", "pipelines"])
def test_no_unpickling_calls_in_the_code_base(package):
    assert unsafe_lines(REPO / package) == []


def test_every_np_load_says_allow_pickle_false():
    """numpy's default is already False; saying it keeps it so if the default ever moves."""
    calls = [
        (p, line)
        for p in sorted((REPO / "funmatch").rglob("*.py"))
        for line in p.read_text().splitlines()
        if re.search(r"\bnp\.load\(", line.split("#")[0])
    ]
    assert calls and all("allow_pickle=False" in line for _, line in calls), calls
