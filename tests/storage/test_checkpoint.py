import json

import pytest
import torch
from torch import nn

from funmatch.errors import CheckpointError
from funmatch.storage.checkpoint import CheckpointManager, Loaded


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return model, opt


def _latest(mgr: CheckpointManager) -> Loaded:
    loaded = mgr.load_latest()
    assert loaded is not None, "no loadable checkpoint"
    return loaded


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(str(tmp_path), "cfg1")
    mgr.save(7, model, opt, {"history": [1, 2]})
    expected_next = torch.rand(3)
    fresh, fresh_opt = _model_and_opt(seed=1)
    loaded = _latest(mgr)
    assert loaded.step == 7 and loaded.meta["extra"]["history"] == [1, 2]
    CheckpointManager.restore(loaded, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)  # the RNG continues where the checkpoint was taken


def test_keeps_last_k_and_skips_corrupt_newest(tmp_path, caplog):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(str(tmp_path), "cfg1", keep=2)
    for step in (10, 20, 30):
        mgr.save(step, model, opt)
    assert mgr.steps() == [30, 20]
    newest = tmp_path / "ckpt-000000030.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    assert _latest(mgr).step == 20
    assert "corrupt" in caplog.text


def test_checkpoint_without_metadata_is_incomplete(tmp_path):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(str(tmp_path), "cfg1")
    mgr.save(10, model, opt)
    (tmp_path / "ckpt-000000020.safetensors").write_bytes(b"partial write")  # crashed before the JSON
    assert _latest(mgr).step == 10


def test_other_config_is_refused_unless_allowed(tmp_path):
    model, opt = _model_and_opt()
    CheckpointManager(str(tmp_path), "cfg1").save(5, model, opt)
    with pytest.raises(CheckpointError, match="runtime.allow_config_change=true"):
        CheckpointManager(str(tmp_path), "cfg2").load_latest()
    assert _latest(CheckpointManager(str(tmp_path), "cfg2", allow_config_change=True)).step == 5


def test_checkpoint_files_hold_no_pickle(tmp_path):
    model, opt = _model_and_opt()
    CheckpointManager(str(tmp_path), "cfg1").save(1, model, opt)
    meta = json.loads((tmp_path / "ckpt-000000001.json").read_text())
    assert meta["sha256"] and meta["config_hash"] == "cfg1"
    from safetensors.torch import load_file

    assert "model/0.weight" in load_file(str(tmp_path / "ckpt-000000001.safetensors"))
