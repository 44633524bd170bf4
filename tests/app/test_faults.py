"""The fault test in CI: distill (CPU, demo-tiny, 13 steps; data resident or streamed by loader
workers) killed with SIGKILL and SIGTERM at seeded random steps, restarted from its checkpoints, must
end with bit-identical weights and lose nothing."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from funmatch.app import cli, faults
from funmatch.storage.checkpoint import CheckpointManager

KILLS = 3  # per signal; `funmatch fault-test` defaults to 5 (docs/reliability.md has those figures)
FAST = ["distill.epochs=0.1", "distill.eval_every=0"]  # 13 steps, no val pass at each worker start


@pytest.fixture(scope="module", params=["resident", "streamed"])
def report(request, tmp_path_factory, dataset_dir, teacher_dir):
    """The split resident, or streamed by DataLoader worker processes (killed with the trainer, or left
    to finish by a SIGTERM that the trainer alone handles)."""
    data_path = [] if request.param == "resident" else ["runtime.resident_max_gb=0", "runtime.loader_workers=1"]
    return faults.fault_test(
        "demo-tiny",
        FAST + data_path,
        kills=KILLS,
        signals=("KILL", "TERM"),
        seed=0,
        workdir=tmp_path_factory.mktemp("faults"),
        dataset_dir=dataset_dir,
        teacher_dir=teacher_dir,
        worker_timeout_s=170,
    )


@pytest.mark.slow
def test_reference_is_a_real_run(report):
    assert report["steps"] == 13 and report["checkpoint_every_steps"] == 3
    assert len(report["reference"]["sha256"]) == 64
    assert [r["signal"] for r in report["runs"]] == ["SIGKILL", "SIGTERM"]


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM"])
def test_killed_run_ends_bit_identical_and_loses_nothing(report, signal):
    run = next(r for r in report["runs"] if r["signal"] == signal)
    print(json.dumps(run, indent=1))  # shown when an assertion fails
    assert run["bit_identical"] and run["sha256"] == report["reference"]["sha256"]
    assert run["history_identical"]  # the logged losses too, not just the weights
    assert run["kills_requested"] == KILLS and run["kills_survived"] == KILLS
    assert run["bytes_lost"] == 0 and run["starts"] == KILLS + 1
    steps = run["kill_steps"]
    assert steps == sorted(set(steps)) and steps[0] >= 1 and steps[-1] < report["steps"]
    for kill in run["kills"]:
        assert kill["signalled_at_step"] >= kill["target_step"]
        # the successor took the newest checkpoint (newer: committed by a worker killed before it could say so)
        assert kill["resumed_from"] >= kill["newest_committed"]
        if signal == "SIGKILL":
            assert kill["exit_code"] == -9
            assert 0 <= kill["steps_redone"] < report["checkpoint_every_steps"] + 1
        else:  # preemption: finish the step, checkpoint it, exit 143; nothing is redone
            assert kill["exit_code"] == 143 and kill["checkpointed_on_signal"]
            assert kill["steps_redone"] == 0 and kill["resumed_from"] == kill["completed_at_death"]
    assert report["ok"]


def test_kill_steps_are_seeded():
    """Same seed, same steps: the figure in docs/reliability.md can be reproduced."""
    import numpy as np

    pick = lambda seed: sorted(np.random.default_rng([seed, 0]).choice(np.arange(1, 32), 5, replace=False))  # noqa
    assert pick(0) == pick(0) and pick(0) != pick(1)


# ---------------------------------------------------------------- the accounting can fail


def _saved(tmp_path, steps=(3, 6, 9)):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    mgr = CheckpointManager(str(tmp_path), "h", keep=3)
    sizes = {}
    for s in steps:
        mgr.save(s, model, opt)
        sizes[s] = sum(Path(f).stat().st_size for f in mgr.files(s))
    return sizes


def test_bytes_lost_counts_a_corrupt_or_missing_committed_checkpoint(tmp_path):
    sizes = _saved(tmp_path)
    assert faults._checkpoint_damage(tmp_path, sizes, keep=3) == (0, [])
    newest = tmp_path / "ckpt-000000009.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    (tmp_path / "ckpt-000000006.json").unlink()
    lost, damaged = faults._checkpoint_damage(tmp_path, sizes, keep=3)
    assert damaged == [6, 9] and lost == sizes[6] + sizes[9]
    (tmp_path / ".ckpt-000000012.safetensors.abc.tmp").write_bytes(b"x" * 7)
    assert faults._stray_bytes(tmp_path) == 7


def test_weight_comparison_sees_a_one_ulp_difference(tmp_path):
    a = {"w": torch.linspace(0, 1, 10)}
    b = {"w": a["w"].clone()}
    b["w"][3] = torch.nextafter(b["w"][3], torch.tensor(2.0))
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    assert faults._same_tensors(tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    assert not faults._same_tensors(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


def test_cli_has_fault_test(capsys):
    args = cli.parser().parse_args(["fault-test", "--signal", "TERM", "--kills", "2", "--json", "r.json"])
    assert (args.command, args.preset, args.signal, args.kills, args.json) == (
        "fault-test",
        "demo-tiny",
        "TERM",
        2,
        "r.json",
    )
    assert cli.main(["fault-test", "--preset", "demo-tiyn"]) == 2  # one clear line, nothing run
    assert "unknown preset 'demo-tiyn'" in capsys.readouterr().err


def test_more_kills_than_steps_is_refused_before_any_run(tmp_path, dataset_dir, teacher_dir):
    with pytest.raises(faults.FaultTestError, match="--kills 40 is not allowed: this run has 32 steps"):
        faults.fault_test("demo-tiny", kills=40, workdir=tmp_path, dataset_dir=dataset_dir, teacher_dir=teacher_dir)
    assert not (tmp_path / "reference").exists()


@pytest.mark.slow
def test_summary_reads_the_report(report):
    text = faults.summary(report)
    assert "SIGKILL" in text and "SIGTERM" in text and "PASS" in text
    json.dumps(report)  # the --json report is plain JSON
