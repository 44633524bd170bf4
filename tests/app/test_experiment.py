"""`funmatch experiment teaching-setups`: seeds per cell, statistics from the runs, the judging rule."""

import json
import math
import statistics

import pytest

from funmatch.app import experiment
from funmatch.app.experiment import FAILS, HOLDS, UNDECIDED, Z_SE
from funmatch.config import VARIANTS


def _rows(values: dict[tuple[str, int], list[float]]) -> list[dict]:
    """Constructed runs: one row per value, seeds 0, 1, ...; loss = 1 − accuracy."""
    return [
        {
            "variant": v,
            "epochs": e,
            "seed": s,
            "steps": 10 * e,
            "test_prec@1": x,
            "test_agree@1": x,
            "final_train_loss": 1 - x,
        }
        for (v, e), xs in values.items()
        for s, x in enumerate(xs)
    ]


def _cell(variant: str, values: list[float]) -> dict:
    return experiment.cells(_rows({(variant, 1): values}))[0]


def test_stats_are_mean_sample_sd_and_standard_error():
    s = experiment.stats([0.70, 0.74, 0.75])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(statistics.mean([0.70, 0.74, 0.75]))
    assert s["sd"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.75]))
    assert s["se"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.75]) / math.sqrt(3))
    one = experiment.stats([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["sd"]) and math.isnan(one["se"])


def test_judge_follows_the_two_standard_error_rule():
    a = _cell("funmatch", [0.80, 0.81, 0.82])  # se = 0.01 / sqrt(3)
    se = math.sqrt(2) * statistics.stdev([0.80, 0.81, 0.82]) / math.sqrt(3)  # both cells have the same spread
    just_above = Z_SE * se * 1.05
    just_below = Z_SE * se * 0.95
    for shift, higher, lower in (
        (just_above, FAILS, HOLDS),  # b is better by a bit more than 2 SE
        (just_below, UNDECIDED, UNDECIDED),
        (0.0, UNDECIDED, UNDECIDED),
        (-just_below, UNDECIDED, UNDECIDED),
        (-just_above, HOLDS, FAILS),  # a is better by a bit more than 2 SE
    ):
        b = _cell("same/ic", [0.80 + shift, 0.81 + shift, 0.82 + shift])
        d = experiment.judge(a, b)
        assert d["diff"] == pytest.approx(-shift, abs=1e-5) and d["se"] == pytest.approx(se, abs=1e-5)
        assert d["verdict"] == higher, shift
        # the same cells, claimed "lower is better" on the loss (1 − accuracy): the same verdicts
        assert experiment.judge(a, b, metric="final_train_loss", lower=True)["verdict"] == higher
        # and "a has the lower accuracy": the mirror image
        assert experiment.judge(a, b, lower=True)["verdict"] == lower
    # a cell with one run has no standard error: nothing is decided, however large the gap
    assert experiment.judge(_cell("funmatch", [0.9]), _cell("same/ic", [0.1]))["verdict"] == UNDECIDED


def test_combine_needs_every_comparison_to_hold():
    assert experiment.combine([HOLDS, HOLDS]) == HOLDS
    assert experiment.combine([HOLDS, UNDECIDED]) == UNDECIDED
    assert experiment.combine([HOLDS, UNDECIDED, FAILS]) == FAILS


def test_claims_on_constructed_rows():
    budgets = (10, 30, 90)
    base = {"fix/rs": 0.60, "fix/cc": 0.70, "fix/ic_ens": 0.72, "ind/rc": 0.71, "ind/ic": 0.69}
    base |= {"same/rc": 0.78, "same/ic": 0.80, "funmatch": 0.80}
    values = {}
    for v, acc in base.items():
        for e in budgets if v in experiment.CORE else budgets[-1:]:
            rise = {10: -0.10, 30: -0.05, 90: 0.0}[e] if v != "fix/cc" else {10: -0.1, 30: 0.0, 90: 0.0}[e]
            values[v, e] = [acc + rise - 0.002, acc + rise, acc + rise + 0.002]
    values["funmatch", 90] = [0.80, 0.81, 0.79]  # == same/ic within noise
    result = {c["claim"]: c for c in experiment.claims(experiment.cells(_rows(values)), budgets)}
    verdict = {name.split(" (")[0]: c["verdict"] for name, c in result.items()}
    assert verdict["90 epochs: funmatch > same/ic"] == UNDECIDED
    assert verdict["90 epochs: same/ic > ind/ic"] == HOLDS
    assert verdict["90 epochs: same/ic > fix/cc"] == HOLDS
    assert verdict["90 epochs: same/rc > ind/rc"] == HOLDS
    assert verdict["90 epochs: every consistent variant"] == HOLDS
    assert verdict["funmatch rises with the budget"] == HOLDS
    assert verdict["fix/cc's student gets worse from 30 to 90 epochs"] == UNDECIDED  # flat
    assert verdict["90 epochs: fix/cc reaches a lower final training loss than same/ic"] == FAILS  # loss 0.30 vs 0.20
    every = next(c for n, c in result.items() if n.startswith("90 epochs: every consistent"))
    assert len(every["comparisons"]) == len(experiment.CONSISTENT) * len(experiment.INCONSISTENT)
    # one inconsistent variant catching up by more than 2 SE turns the conjunction into "does not hold"
    values["ind/rc", 90] = [0.85, 0.851, 0.852]
    again = {
        c["claim"].split(" (")[0]: c["verdict"] for c in experiment.claims(experiment.cells(_rows(values)), budgets)
    }
    assert again["90 epochs: every consistent variant"] == FAILS
    assert again["90 epochs: same/rc > ind/rc"] == FAILS


@pytest.mark.slow  # 36 distillations (12 cells × 3 seeds): about a minute on 2 quiet cores
def test_smoke_size_runs_the_grid_with_three_seeds(tmp_path):
    spec = experiment.SIZES["smoke"]
    result = experiment.teaching_setups("smoke", tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["claims"] == result["claims"]
    assert saved["overrides"]["distill.crop_min_area"] == 0.05  # the paper's 5–100 %, not the demo's 30 %
    # every variant at the longest budget, the core ones at every budget, each with >= 3 seeds
    cells = {(c["variant"], c["epochs"]): c for c in saved["cells"]}
    assert set(cells) == set(experiment.grid(spec))
    assert {v for v, e in cells if e == spec["budgets"][-1]} == set(VARIANTS)
    for (v, e), c in cells.items():
        runs = [r for r in saved["rows"] if (r["variant"], r["epochs"]) == (v, e)]
        assert len(runs) >= 3 and sorted(r["seed"] for r in runs) == sorted(spec["seeds"])
        for m in experiment.METRICS:
            xs = [r[m] for r in runs]
            assert c[m]["n"] == len(xs)
            assert c[m]["mean"] == pytest.approx(statistics.mean(xs), abs=1e-6)
            assert c[m]["sd"] == pytest.approx(statistics.stdev(xs), abs=1e-6)
            assert c[m]["se"] == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), abs=1e-6)
    # the seed changes the run: not every cell's three accuracies (or losses) are the same
    assert any(c["final_train_loss"]["sd"] > 0 for c in saved["cells"])
    # the claims in results.json are the ones the judging rule gives on its cells
    assert saved["claims"] == json.loads(json.dumps(experiment.claims(saved["cells"], spec["budgets"])))
    assert "± " in (tmp_path / "table.md").read_text() and (tmp_path / "setups.png").stat().st_size > 0
    # a rerun into the same directory repeats no run
    lines = (tmp_path / "runs.jsonl").read_text()
    assert len(lines.splitlines()) == len(saved["rows"])
    assert experiment.teaching_setups("smoke", tmp_path)["rows"] == saved["rows"]
    assert (tmp_path / "runs.jsonl").read_text() == lines
