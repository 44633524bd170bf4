"""Small-scale reproduction of the paper's teaching-setup comparison (§3.1, Fig. 3 / App. C).

    funmatch experiment teaching-setups [--size cpu|gpu|smoke] [--output DIR]

Data: the bundled Fashion-MNIST subset (28×28 grayscale product images, 10 classes, upsampled to the
models' 32 px), train split cut to a few hundred images per class so that long budgets are long in epochs.
One teacher (trained once, `runtime.seed` 0, shared by every run), then the teaching variants of
`distill.setup`: the four core ones (fix/cc, ind/ic, same/ic, funmatch) at every budget and the other
four (fix/rs, fix/ic_ens, ind/rc, same/rc) at the longest budget only, each cell with several seeds
(`runtime.seed` = 0, 1, 2, ...: the student's init, the batch order and every crop / flip / mixup draw).
Every run is a full distill run with the paper's inception crop (5–100 % of the area, set explicitly,
not the demo preset's 30–100 %), evaluated on the test split.

Writes into DIR: runs.jsonl (one line per finished run, appended as they finish; a rerun into the same
DIR skips the runs already there), results.json (every run, per cell the mean, standard deviation and
standard error over seeds, the claims as judged), table.md and setups.png (means with ±1 sd bars).

Each of the paper's claims is judged from cell means (`judge`): the difference of means in the claimed
direction against the standard error of that difference, sqrt(se_a² + se_b²). "holds" if it exceeds
Z_SE standard errors in the claimed direction, "does not hold" if it exceeds Z_SE standard errors the
other way, else "undecided at this size". A claim made of several comparisons holds when every one
holds and does not hold when any one does not hold. The standard errors are over seeds on one fixed test
split and one teacher: they measure training noise, not test-set sampling error or teacher variance.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from funmatch import config, runtime
from funmatch.config import VARIANTS
from funmatch.data import prepared
from funmatch.recipe import models
from funmatch.recipe.metrics import distances, prec1
from funmatch.stages import distill, evaluate, finetune, prepare

log = logging.getLogger(__name__)

CORE = ("fix/cc", "ind/ic", "same/ic", "funmatch")  # at every budget
OTHERS = ("fix/rs", "fix/ic_ens", "ind/rc", "same/rc")  # at the longest budget only
CONSISTENT = ("same/rc", "same/ic", "funmatch")
INCONSISTENT = ("fix/rs", "fix/cc", "fix/ic_ens", "ind/rc", "ind/ic")
METRICS = ("test_prec@1", "test_agree@1", "final_train_loss")
Z_SE = 2.0  # a difference of means counts when it exceeds this many standard errors of the difference
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided at this size"

# Every size: the paper's crop (5–100 %, where the demo preset has 30–100 %), no val evaluation during
# training (the runs are compared on test), and a fix/ic_ens ensemble far smaller than the paper's 1,000.
COMMON = {"distill.crop_min_area": 0.05, "distill.eval_every": 0}

# cpu: ~15 min on 2 quiet cores (48 distillations; 5× that on a loaded machine); gpu: one H100/H200, not yet
# timed; smoke: a minute (tests). `test_images` 0: the whole test split (2,000 images), else its first N.
SIZES: dict[str, dict] = {
    "cpu": {
        "budgets": (4, 12, 36),
        "seeds": (0, 1, 2),
        "test_images": 0,
        "overrides": {
            "data.max_train_per_class": 200,
            "distill.batch_size": 128,
            "distill.warmup_steps": 20,
            "distill.ensemble_crops": 16,
        },
    },
    "smoke": {
        "budgets": (1, 2),
        "seeds": (0, 1, 2),
        "test_images": 100,
        "overrides": {
            "data.max_train_per_class": 4,
            "distill.batch_size": 20,
            "distill.warmup_steps": 1,
            "distill.ensemble_crops": 2,
            "finetune.steps": 4,
            "finetune.batch_size": 20,
        },
    },
    "gpu": {
        "budgets": (30, 300, 3000),
        "seeds": (0, 1, 2),
        "test_images": 0,
        "overrides": {
            "distill.ensemble_crops": 100,
            "data.max_train_per_class": 200,
            "data.stored_resolution": 40,
            "teacher.arch": "bit-r50x1",
            "teacher.resolution": 64,
            "student.arch": "bit-r14-mini",
            "student.resolution": 64,
            "finetune.steps": 1500,
            "finetune.batch_size": 256,
            "distill.batch_size": 512,
            "distill.warmup_steps": 50,
            "runtime.device": "auto",
            "runtime.precision": "bf16",
        },
    },
}


def grid(spec: dict) -> list[tuple[str, int]]:
    """The (variant, epochs) cells of a size: CORE at every budget, OTHERS at the longest only."""
    budgets = spec["budgets"]
    return [(v, b) for b in budgets for v in CORE] + [(v, budgets[-1]) for v in OTHERS]


def teaching_setups(size: str, out_dir: str | Path) -> dict:
    """Runs the grid (every cell × every seed); returns the results and writes runs.jsonl, results.json,
    table.md and setups.png into `out_dir`."""
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    overrides = COMMON | spec["overrides"]
    base = config.load("demo", overrides)
    device = runtime.setup(base.runtime)
    machine = runtime.machine(device)
    prepare.run(base, out / "dataset")
    if not (out / "teacher" / "model.json").exists():  # one teacher (runtime.seed 0) for every run
        finetune.run(base, out / "dataset", out / "teacher")
    test_x, test_y = (torch.from_numpy(a) for a in prepared.load_split(out / "dataset", "test"))
    test_f = torch.from_numpy(prepared.load_frames(out / "dataset", "test"))
    if spec["test_images"]:
        test_x, test_y, test_f = (a[: spec["test_images"]] for a in (test_x, test_y, test_f))
    teachers, t_info = models.load_bundle(out / "teacher", device)
    t_logits = evaluate.predict(teachers, test_x, t_info["resolution"], base.eval, device, test_f)

    done = _finished_runs(out / "runs.jsonl")
    rows = []
    # The core cells for every seed first, then the others: an interrupted grid has whole seeds of the
    # core cells, and `report` summarises whatever runs.jsonl holds.
    order = [(s, c) for part in (CORE, OTHERS) for s in spec["seeds"] for c in grid(spec) if c[0] in part]
    for seed, (variant, epochs) in order:
        cfg = config.load(
            "demo", overrides | {"distill.setup": variant, "distill.epochs": epochs, "runtime.seed": seed}
        )
        key = (variant, epochs, seed, cfg.hash())
        if key in done:
            rows.append(done[key])
            continue
        run_dir = out / f"student-{variant.replace('/', '_')}-{epochs}-s{seed}"
        t0 = time.perf_counter()
        info = distill.run(cfg, out / "dataset", out / "teacher", run_dir)
        (student,), _ = models.load_bundle(run_dir, device)
        s_logits = evaluate.predict([student], test_x, cfg.student.resolution, cfg.eval, device, test_f)
        history = json.loads((run_dir / "history.json").read_text())
        row = {
            "variant": variant,
            "epochs": epochs,
            "seed": seed,
            "config_hash": cfg.hash(),
            "steps": info["steps"],
            "test_prec@1": round(prec1(s_logits, test_y), 4),
            "test_agree@1": round(distances(s_logits, t_logits)["agree@1"], 4),
            "final_train_loss": round(history[-1]["loss"], 5),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        with open(out / "runs.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        log.info("%s", row)
    header = {
        "size": size,
        "teacher_test_prec@1": round(prec1(t_logits, test_y), 4),
        "teacher_seed": base.runtime.seed,
        "seeds": list(spec["seeds"]),
        "budgets": list(spec["budgets"]),
        "train_images": prepared.read_manifest(out / "dataset")["splits"]["train"]["count"],
        "test_images": len(test_y),
        "overrides": overrides,
        "z_se": Z_SE,
        "command": f"funmatch experiment teaching-setups --size {size}",
        "machine": machine,
        "date": date.today().isoformat(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    return report(header, rows, out)


def report(header: dict, rows: list[dict], out: Path) -> dict:
    """results.json (`header`, the runs, the cells' statistics, the claims), table.md and setups.png from
    `rows` (also a partial grid: claims on missing cells are left out)."""
    cell_stats = cells(rows)
    result = header | {
        "runs_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "cells": cell_stats,
        "claims": claims(cell_stats, header["budgets"]),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table(result))
    plot(result, out / "setups.png")
    return result


def _finished_runs(path: Path) -> dict[tuple, dict]:
    """Rows of runs.jsonl by (variant, epochs, seed, config hash): the runs a rerun need not repeat."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["epochs"], r["seed"], r["config_hash"]): r for r in rows}


def stats(values: list[float]) -> dict[str, float]:
    """n, mean, sample standard deviation (n − 1) and standard error of the mean (sd / √n); sd and se are
    NaN below two values."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n)}


def cells(rows: list[dict]) -> list[dict]:
    """Per (variant, epochs): the seeds, steps and `stats` of every metric over the cell's runs."""
    by_cell: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["variant"], r["epochs"]), []).append(r)
    return [
        {
            "variant": v,
            "epochs": e,
            "steps": runs[0]["steps"],
            "seeds": [r["seed"] for r in runs],
            **{m: {k: round(x, 6) for k, x in stats([r[m] for r in runs]).items()} for m in METRICS},
        }
        for (v, e), runs in by_cell.items()
    ]


def judge(a: dict, b: dict, metric: str = "test_prec@1", lower: bool = False) -> dict[str, Any]:
    """The claim "cell a beats cell b on `metric`" (higher, or lower with `lower`), from two `cells`
    entries: the difference of means in the claimed direction, its standard error sqrt(se_a² + se_b²) and
    the verdict: HOLDS beyond +Z_SE standard errors, FAILS beyond −Z_SE, else UNDECIDED (also when a cell
    has under two runs, so no standard error)."""
    sign = -1.0 if lower else 1.0
    diff = sign * (a[metric]["mean"] - b[metric]["mean"])
    se = math.sqrt(a[metric]["se"] ** 2 + b[metric]["se"] ** 2)
    verdict = UNDECIDED
    if not math.isnan(se):
        verdict = HOLDS if diff > Z_SE * se else FAILS if diff < -Z_SE * se else UNDECIDED
    return {
        "a": f"{a['variant']}@{a['epochs']}",
        "b": f"{b['variant']}@{b['epochs']}",
        "metric": metric,
        "claimed": "lower" if lower else "higher",
        "diff": round(diff, 6),
        "se": round(se, 6),
        "verdict": verdict,
    }


def combine(verdicts: list[str]) -> str:
    """A claim of several comparisons: FAILS if any fails, HOLDS if all hold, else UNDECIDED."""
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else UNDECIDED


def claims(cell_stats: list[dict], budgets: tuple[int, ...] | list[int]) -> list[dict]:
    """The paper's claims (§3.1, Fig. 3; the ImageNet schedules of §3.3), each judged from the cells."""
    cell = {(c["variant"], c["epochs"]): c for c in cell_stats}
    longest, before = budgets[-1], budgets[-2]

    L = longest
    # (claim, [(cell a, cell b, metric, lower is the claimed direction), ...]): "a beats b" each
    spec: list[tuple[str, list[tuple[tuple[str, int], tuple[str, int], str, bool]]]] = [
        (
            f"{L} epochs: funmatch > same/ic (function matching is the best setup)",
            [(("funmatch", L), ("same/ic", L), "test_prec@1", False)],
        ),
        (
            f"{L} epochs: same/ic > ind/ic (one crop for both beats independent crops)",
            [(("same/ic", L), ("ind/ic", L), "test_prec@1", False)],
        ),
        (
            f"{L} epochs: same/ic > fix/cc (consistent beats a fixed central-crop teacher)",
            [(("same/ic", L), ("fix/cc", L), "test_prec@1", False)],
        ),
        (
            f"{L} epochs: same/rc > ind/rc (consistency helps with mild crops too)",
            [(("same/rc", L), ("ind/rc", L), "test_prec@1", False)],
        ),
        (
            f"{L} epochs: every consistent variant ({', '.join(CONSISTENT)}) > every inconsistent one "
            f"({', '.join(INCONSISTENT)})",
            [((c, L), (i, L), "test_prec@1", False) for c in CONSISTENT for i in INCONSISTENT],
        ),
        (
            f"funmatch rises with the budget ({' < '.join(str(b) for b in budgets)} epochs)",
            [
                (("funmatch", b), ("funmatch", a), "test_prec@1", False)
                for a, b in zip(budgets, budgets[1:], strict=False)
            ],
        ),
        (
            f"fix/cc's student gets worse from {before} to {L} epochs (a fixed teacher overfits)",
            [(("fix/cc", before), ("fix/cc", L), "test_prec@1", False)],
        ),
        (
            f"{L} epochs: fix/cc reaches a lower final training loss than same/ic (fixed targets are memorised)",
            [(("fix/cc", L), ("same/ic", L), "final_train_loss", True)],
        ),
    ]
    out = []
    for name, pairs in spec:
        if all(a in cell and b in cell for a, b, _, _ in pairs):  # a partial grid: claims on its cells only
            cs = [judge(cell[a], cell[b], metric=m, lower=lower) for a, b, m, lower in pairs]
            out.append({"claim": name, "verdict": combine([c["verdict"] for c in cs]), "comparisons": cs})
    return out


def table(result: dict) -> str:
    """Markdown: student test prec@1 (mean ± sd over seeds, %) per variant and budget, agreement and
    training loss at the longest budget, and the claims with their differences and standard errors."""
    budgets = result["budgets"]
    cell = {(c["variant"], c["epochs"]): c for c in result["cells"]}
    steps = {e: c["steps"] for (_, e), c in cell.items()}
    seeds = len(result["seeds"])

    def pct(s: dict) -> str:
        return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"

    lines = [
        f"Student test prec@1 in % (mean ± sd over {seeds} seeds; teacher {100 * result['teacher_test_prec@1']:.2f}):",
        "",
        "| variant | " + " | ".join(f"{b} epochs ({steps.get(b, 0):,} steps)" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for v in VARIANTS:
        if any((v, b) in cell for b in budgets):
            row = [pct(cell[v, b]["test_prec@1"]) if (v, b) in cell else "–" for b in budgets]
            lines.append(f"| {v} | " + " | ".join(row) + " |")
    longest = budgets[-1]
    lines += [
        "",
        f"At {longest} epochs (mean ± sd): top-1 agreement with the teacher on test (%) and final training KD loss:",
        "",
        "| variant | agree@1 | final train loss |",
        "|---|---|---|",
    ]
    for v in VARIANTS:
        if (v, longest) in cell:
            c = cell[v, longest]
            loss = c["final_train_loss"]
            lines.append(f"| {v} | {pct(c['test_agree@1'])} | {loss['mean']:.3f} ± {loss['sd']:.3f} |")
    lines += [
        "",
        f"Claims, judged from the means: difference in the claimed direction ± its standard error "
        f"(√(se_a² + se_b²)); holds beyond +{result['z_se']:g} SE, does not hold beyond −{result['z_se']:g} SE, "
        "else undecided. Accuracy differences in points.",
        "",
    ]
    for c in result["claims"]:
        lines.append(f"- {c['claim']}: **{c['verdict']}**")
        for d in c["comparisons"]:
            if d["metric"] == "final_train_loss":
                gap = f"{d['diff']:+.3f} ± {d['se']:.3f} (loss)"
            else:
                gap = f"{100 * d['diff']:+.2f} ± {100 * d['se']:.2f} pts"
            lines.append(f"  - {d['a']} vs {d['b']}: {gap} → {d['verdict']}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Student test prec@1 per variant against the budget: means with ±1 sd error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    variants = [v for v in VARIANTS if any(c["variant"] == v for c in result["cells"])]
    for i, v in enumerate(variants):
        pts = sorted((c["epochs"], c["test_prec@1"]) for c in result["cells"] if c["variant"] == v)
        x = [e * 1.03 ** (i - len(variants) / 2) for e, _ in pts]  # a small offset so the bars do not overlap
        ax.errorbar(
            x,
            [100 * s["mean"] for _, s in pts],
            yerr=[100 * (0 if math.isnan(s["sd"]) else s["sd"]) for _, s in pts],
            marker="o" if v in CORE else "s",
            ls="-" if len(pts) > 1 else "none",
            capsize=3,
            label=v,
        )
    ax.axhline(100 * result["teacher_test_prec@1"], color="black", ls=":", label="teacher")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(result["budgets"], [str(b) for b in result["budgets"]])
    ax.set_xlabel("distillation epochs")
    ax.set_ylabel(f"student test prec@1 (%), mean ± sd, {len(result['seeds'])} seeds")
    ax.set_title(f"Teaching variants, Fashion-MNIST subset ({result['size']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
